"""A partial source: the part of a transformers MoE checkpoint that distillation needs.

Distilling the router of MoE layer `layer` reads the token embeddings and the decoder layers up to
and including the one that holds that MoE block. The checkpoint's config is cut to those layers
and the base model (no LM head) is loaded from it, in the stored dtype: tensors of the layers
above are never materialised (safetensors are memory-mapped, so their bytes are not read either),
and memory and time do not grow with them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Tuple, Union

import torch
from torch import nn

from ..nn.blocks import moe_blocks

__all__ = ["load_source", "moe_decoder_layers"]


def moe_decoder_layers(config) -> list:
    """Indices of the decoder layers that hold a MoE block, in order (the model is built on meta)."""
    import transformers

    try:
        with torch.device("meta"):
            model = transformers.AutoModel.from_config(config)
    except Exception as e:  # noqa: BLE001 - any family transformers cannot build
        raise ValueError(f"transformers cannot build a {type(config).__name__} model ({e})") from None
    found = []
    for name, _, _ in moe_blocks(model):
        m = re.search(r"(?:^|\.)layers\.(\d+)\.", name + ".")
        if m is None:
            raise ValueError(f"grouter: cannot tell which decoder layer holds the MoE block {name!r}")
        found.append(int(m.group(1)))
    return found


def load_source(path: Union[str, Path], layer: int = 0, device: Union[str, torch.device] = "cpu",
                dtype: Optional[torch.dtype] = None) -> Tuple[nn.Module, dict]:
    """(model, info): the base model of the checkpoint in `path` cut after MoE layer `layer`.

    info: num_experts, top_k, vocab_size, hidden_size, the decoder layer kept last, the layers in
    the checkpoint. dtype None keeps the stored one. Raises ValueError for a folder that is not a
    transformers MoE checkpoint.
    """
    import transformers

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"--source {path}: no such folder (a local transformers model folder is expected)")
    if not (path / "config.json").is_file():
        raise ValueError(f"--source {path}: no config.json (not a transformers model folder)")
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, KeyError, OSError) as e:
        raise ValueError(f"--source {path}: unreadable config.json ({e})") from None
    total = getattr(config, "num_hidden_layers", None)
    try:
        moe_layers = moe_decoder_layers(config)
    except ValueError as e:
        raise ValueError(f"--source {path}: {e}") from None
    if not moe_layers:
        raise ValueError(f"--source {path}: {type(config).__name__} has no MoE blocks grouter can read "
                         "(experts with gate_up_proj and a gate or router)")
    if not -len(moe_layers) <= layer < len(moe_layers):
        raise ValueError(f"--layer {layer}: the source has {len(moe_layers)} MoE layers")
    keep = moe_layers[layer] + 1
    _cut_layers(config, total, keep)
    kwargs = dict(config=config, local_files_only=True, dtype=dtype if dtype is not None else "auto")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the cut layers' weights are "unused": expected
    try:
        model = transformers.AutoModel.from_pretrained(path, **kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)
    model = model.to(device).eval()
    block = moe_blocks(model)[layer][1]
    gate = next(getattr(block, a) for a in ("gate", "router") if hasattr(block, a))
    info = dict(num_experts=block.experts.num_experts, top_k=getattr(gate, "top_k", None),
                vocab_size=config.vocab_size, hidden_size=getattr(config, "hidden_size", None),
                decoder_layers_kept=keep, decoder_layers_total=total, model_type=config.model_type)
    return model, info


def _cut_layers(config, total: Optional[int], keep: int) -> None:
    """num_hidden_layers = keep, and per-layer lists (layer_types, ...) cut to match."""
    for key, value in list(vars(config).items()):
        if isinstance(value, (list, tuple)) and total is not None and len(value) == total and key != "architectures":
            setattr(config, key, type(value)(value[:keep]))
    config.num_hidden_layers = keep
