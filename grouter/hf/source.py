"""A partial source: the part of a transformers MoE checkpoint that distillation needs.

Distilling the router of MoE layer `layer` reads the token embeddings and the decoder layers up to
and including the one that holds that MoE block. The checkpoint's config is cut to those layers
and the base model (no LM head) is loaded from it, in the stored dtype: tensors of the layers
above are never materialised (safetensors are memory-mapped, so their bytes are not read either),
and memory and time do not grow with them. Every tensor of the loaded part must be in the
checkpoint: a missing or mis-shaped one raises naming it (transformers would initialise it at
random and carry on), and an unreadable shard raises one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple, Union

import torch
from torch import nn

from ..nn.transformers_moe import decoder_layer_of, moe_blocks

__all__ = ["load_source", "source_config", "moe_decoder_layers", "has_tokenizer"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


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
        index = decoder_layer_of(name)
        if index is None:
            raise ValueError(f"grouter: cannot tell which decoder layer holds the MoE block {name!r}")
        found.append(index)
    return found


def has_tokenizer(path: Union[str, Path]) -> bool:
    """Whether a model folder carries tokenizer files."""
    return any((Path(path) / name).is_file() for name in _TOKENIZER_FILES)


def source_config(path: Union[str, Path], layer: int = 0) -> Tuple[object, List[int]]:
    """(config, decoder layers holding MoE blocks) of the checkpoint in `path`, read from config.json
    alone (no weights): enough to check a distillation's arguments before loading anything."""
    import transformers

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"--source {path}: no such folder (a local transformers model folder is expected)")
    if not (path / "config.json").is_file():
        raise ValueError(f"--source {path}: no config.json (not a transformers model folder)")
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - ValueError, KeyError, OSError, JSON errors ...
        raise ValueError(f"--source {path}: unreadable config.json ({_first_line(e)})") from None
    try:
        moe_layers = moe_decoder_layers(config)
    except ValueError as e:
        raise ValueError(f"--source {path}: {e}") from None
    if not moe_layers:
        raise ValueError(f"--source {path}: {type(config).__name__} has no MoE blocks grouter can read "
                         "(experts with gate_up_proj and a gate or router)")
    if not -len(moe_layers) <= layer < len(moe_layers):
        raise ValueError(f"--layer {layer}: the source has {len(moe_layers)} MoE layers")
    return config, moe_layers


def load_source(path: Union[str, Path], layer: int = 0, device: Union[str, torch.device] = "cpu",
                dtype: Optional[torch.dtype] = None) -> Tuple[nn.Module, dict]:
    """(model, info): the base model of the checkpoint in `path` cut after MoE layer `layer`.

    info: num_experts, top_k, vocab_size, hidden_size, the decoder layer kept last, the layers in
    the checkpoint. dtype None keeps the stored one. Raises ValueError for a folder that is not a
    transformers MoE checkpoint, or one whose loaded part is incomplete or unreadable.
    """
    import transformers

    path = Path(path)
    config, moe_layers = source_config(path, layer)
    total = getattr(config, "num_hidden_layers", None)
    keep = moe_layers[layer] + 1
    _cut_layers(config, total, keep)
    kwargs = dict(config=config, local_files_only=True, dtype=dtype if dtype is not None else "auto")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the cut layers' weights are "unused": expected
    try:
        model, loading = transformers.AutoModel.from_pretrained(path, output_loading_info=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - a truncated or garbled shard, an unknown dtype, ...
        raise ValueError(f"--source {path}: cannot read the checkpoint ({type(e).__name__}: {_first_line(e)})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    _check_complete(path, loading)
    model = model.to(device).eval()
    _, block, attr = moe_blocks(model)[layer]
    gate = getattr(block, attr)
    info = dict(num_experts=block.experts.num_experts, top_k=getattr(gate, "top_k", None),
                vocab_size=config.vocab_size, hidden_size=getattr(config, "hidden_size", None),
                decoder_layers_kept=keep, decoder_layers_total=total, model_type=config.model_type)
    return model, info


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "no message"


def _check_complete(path: Path, loading: dict) -> None:
    """Refuse a part whose tensors are not all in the checkpoint, or not of the stored shapes."""
    for what, keys in (("has no", loading.get("missing_keys")), ("has another shape for", loading.get("mismatched_keys"))):
        keys = sorted(k if isinstance(k, str) else k[0] for k in keys or ())
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise ValueError(f"--source {path}: the checkpoint {what} {keys[0]}{more}, which the distilled layers need; "
                             "they would be initialised at random")
    if loading.get("error_msgs"):
        raise ValueError(f"--source {path}: {_first_line(Exception(loading['error_msgs'][0]))}")


def _cut_layers(config, total: Optional[int], keep: int) -> None:
    """num_hidden_layers = keep, and per-layer lists (layer_types, ...) cut to match."""
    for key, value in list(vars(config).items()):
        if isinstance(value, (list, tuple)) and total is not None and len(value) == total and key != "architectures":
            setattr(config, key, type(value)(value[:keep]))
    config.num_hidden_layers = keep
