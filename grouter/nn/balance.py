"""Load-balance metrics of top-k routes: MaxVio and the coefficient of variation of expert load.

In grouter.nn, the lowest layer that uses them (learned routers measure their balance too);
grouter.router re-exports them.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["expert_load", "max_vio", "load_cv"]


def expert_load(expert_ids: Tensor, num_experts: int) -> Tensor:
    """float [E]: routed slots per expert."""
    return torch.bincount(expert_ids.reshape(-1).long().cpu(), minlength=num_experts).double()


def max_vio(expert_ids: Tensor, num_experts: int) -> float:
    """(max load - mean load) / mean load: 0 when perfectly balanced."""
    load = expert_load(expert_ids, num_experts)
    mean = load.mean()
    return float((load.max() - mean) / mean) if mean > 0 else 0.0


def load_cv(expert_ids: Tensor, num_experts: int) -> float:
    """Coefficient of variation (std / mean) of the expert load."""
    load = expert_load(expert_ids, num_experts)
    mean = load.mean()
    return float(load.std(unbiased=False) / mean) if mean > 0 else 0.0
