"""The contract with transformers (v5) MoE blocks: everything grouter assumes about them, in one place.

A transformers MoE block is a module with

- ``experts``: holds ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I] (under transformers'
  expert parallelism, DTensors of the global shape with ``_is_expert_parallel`` set and
  ``num_experts`` the rank's count) and is called as ``experts(hidden [T, H], top_k_index [T, K],
  top_k_weights [T, K])``;
- a gate module, ``gate`` or ``router``, whose forward returns ``(router_logits [T, E],
  top_k_weights [T, K], top_k_index [T, K])`` and which the block's forward unpacks as those three.

grouter.hf (attach, the source loader) and grouter.router (the teacher's capture) read blocks
through these functions only. It lives in grouter.nn, the lowest layer that needs it (the capture
in grouter.router uses it), and imports nothing from transformers.
"""

from __future__ import annotations

import inspect
import re
from typing import Optional, Tuple

from torch import Tensor, nn

from .moe import MoE

__all__ = ["moe_blocks", "gate_logits", "gate_output", "chosen_ids", "global_num_experts", "check_gate_call",
           "decoder_layer_of"]

_GATE_NAMES = ("gate", "router")


def moe_blocks(model: nn.Module) -> list:
    """(name, block, gate attribute) of every MoE block: a module with routed `experts` and a gate."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, MoE):  # grouter's own layer takes its routing as an argument
            continue
        experts = getattr(module, "experts", None)
        if not isinstance(experts, nn.Module) or not hasattr(experts, "gate_up_proj"):
            continue
        for attr in _GATE_NAMES:
            if isinstance(getattr(module, attr, None), nn.Module):
                found.append((name, module, attr))
                break
    return found


def gate_logits(output) -> Tensor:
    """The router logits in what a gate's forward returned."""
    return output[0] if isinstance(output, (tuple, list)) else output


def gate_output(logits: Tensor, weights: Tensor, ids: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """What a gate returns to its block: (router_logits, top_k_weights, top_k_index)."""
    return logits, weights, ids


def chosen_ids(args: tuple, kwargs: dict) -> Optional[Tensor]:
    """The expert ids [T, K] in the arguments a block passed its experts (the first 2-D integer
    tensor after the hidden states), or None."""
    candidates = list(args[1:]) + list(kwargs.values())
    return next((a for a in candidates if isinstance(a, Tensor) and not a.is_floating_point() and a.dim() == 2), None)


def global_num_experts(experts: nn.Module) -> int:
    """The model's expert count. transformers' expert parallelism (DistributedConfig(ep_size=...))
    sets `num_experts` to the rank's local count and shards the weights as DTensors of the global
    shape: routes name global experts, which its dispatch maps to the ranks."""
    if getattr(experts, "_is_expert_parallel", False):
        return int(experts.gate_up_proj.shape[0])
    return experts.num_experts


_GATE_CALL = re.compile(r"^\s*([\w\s,]+?)\s*=\s*self\.(\w+)\(", re.M)


def check_gate_call(block: nn.Module, attr: str, who: str) -> None:
    """Raise unless the block's forward unpacks its gate as (logits, weights, ids).

    Read from the forward's source, the one place the unpacking shows before a block runs with a
    replaced gate (a block unpacking another order would mix weights and ids silently).
    """
    try:
        source = inspect.getsource(type(block).forward)
    except (OSError, TypeError):
        return  # no source to read (compiled, generated): trust the common convention
    for lhs, name in _GATE_CALL.findall(source):
        if name != attr:
            continue
        names = [n.strip() for n in lhs.split(",")]
        if len(names) != 3 or not (names[0] == "_" or "logit" in names[0]):
            raise ValueError(f"{who}: {type(block).__name__} unpacks its {attr} as ({', '.join(names)}); "
                             "grouter attaches to MoE blocks whose gate returns (logits, weights, ids)")


def decoder_layer_of(block_name: str) -> Optional[int]:
    """The decoder layer index in a block's module name (``model.layers.3.mlp`` -> 3), or None."""
    m = re.search(r"(?:^|\.)layers\.(\d+)\.", block_name + ".")
    return None if m is None else int(m.group(1))
