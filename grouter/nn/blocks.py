"""Finding the MoE blocks of a model built elsewhere (transformers): modules with routed experts and a gate."""

from __future__ import annotations

from torch import nn

from .moe import MoE

__all__ = ["moe_blocks"]

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
