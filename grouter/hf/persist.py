"""Saving and loading a transformers MoE model together with its attached Grouter.

A folder is what transformers writes, plus the Grouter's verified artifact in ``grouter/`` and a
marker in ``config.json`` (``"grouter": {"path": "grouter", "checksum": ...}``; ``"path": null`` for
a model attached without a Grouter, whose routes come from outside). config.json also names
``"experts_implementation": "grouter"``, so that loading the folder with plain transformers is never
silently routed by the model's untrained gates: without grouter imported transformers refuses the
unknown implementation; with it, the first forward raises and says to use
``grouter.hf.from_pretrained``; on another implementation chosen explicitly, its first forward warns
(`grouter.hf.register` guards transformers' other experts implementations).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

from torch import nn

from ..router.model import Grouter
from .attach import attach
from .attachment import MARKER_FORMAT, attachment_of, save_attached

__all__ = ["save_pretrained", "from_pretrained"]


def save_pretrained(model: nn.Module, path: Union[str, Path], *args, **kwargs) -> None:
    """`model.save_pretrained(path, ...)` and, if a Grouter is attached, the Grouter in `path/grouter/`.

    An attached model's own ``model.save_pretrained`` does the same (`attachment.save_attached`).
    """
    if attachment_of(model) is None:
        type(model).save_pretrained(model, Path(path), *args, **kwargs)
    else:
        save_attached(model, path, *args, **kwargs)


def from_pretrained(path: Union[str, Path], model_class: Any = None, **kwargs) -> nn.Module:
    """Load a folder written by `save_pretrained`: the model on the ``"grouter"`` experts
    implementation with its Grouter attached (or attached without one, for routes from outside).

    kwargs go to transformers' ``from_pretrained`` (dtype, device_map, ...); `model_class` defaults to
    ``AutoModelForCausalLM``. A folder without a saved Grouter raises ValueError.
    """
    import transformers

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"grouter.hf.from_pretrained: {path} is not a folder (models are loaded from disk only)")
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    marker = getattr(config, "grouter", None)
    if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT:
        raise ValueError(f"grouter.hf.from_pretrained: {path / 'config.json'} records no Grouter (save the model with "
                         "grouter.hf.save_pretrained, or load it with transformers and attach one)")
    g = None
    if marker.get("path") is not None:
        g = Grouter.load(path / marker["path"])
        if g.checksum() != marker.get("checksum"):
            raise ValueError(f"grouter.hf.from_pretrained: the Grouter in {path / marker['path']} is not the one saved "
                             "with this model (checksum mismatch)")
    model_class = model_class or transformers.AutoModelForCausalLM
    kwargs.setdefault("experts_implementation", "grouter")
    kwargs.setdefault("local_files_only", True)
    model = model_class.from_pretrained(path, **kwargs)
    if g is not None:
        device = next(model.parameters()).device
        g = g.to(device)
    attach(model, g)
    return model
