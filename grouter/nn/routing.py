"""A top-k routing ready for dispatch: expert ids, gate weights and their routing plan.

With fixed routing (a Grouter) every MoE layer of a model routes the same tokens the same way, so
the plan is built once per forward pass and handed to each layer: `Routing.prepare` does that.
Sharing is explicit (the caller holds the Routing), never a cache keyed on tensor identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from torch import Tensor

from .. import ops

__all__ = ["Routing", "RoutingLike", "flatten_routing", "as_routing"]


@dataclass(frozen=True)
class Routing:
    """expert_ids [T, K], weights [T, K] and the RoutingPlan of expert_ids."""

    expert_ids: Tensor
    weights: Tensor
    plan: ops.RoutingPlan

    @classmethod
    def prepare(cls, expert_ids: Tensor, weights: Tensor, num_experts: int) -> "Routing":
        """Flatten leading dims to tokens and build the plan (once, for every layer that uses it)."""
        ids, w = flatten_routing(expert_ids, weights)
        return cls(ids, w, ops.routing_plan(ids, num_experts))

    @property
    def num_experts(self) -> int:
        return self.plan.num_experts

    @property
    def top_k(self) -> int:
        return self.expert_ids.shape[1]


RoutingLike = Union[Routing, "tuple[Tensor, Tensor]"]


def flatten_routing(expert_ids: Tensor, weights: Tensor) -> "tuple[Tensor, Tensor]":
    """(expert_ids, weights) [..., K] -> [T, K] each; raises ValueError unless their shapes agree."""
    ids = expert_ids if expert_ids.dim() == 2 else expert_ids.reshape(-1, expert_ids.shape[-1])
    w = weights if weights.dim() == 2 else weights.reshape(-1, weights.shape[-1])
    if ids.shape != w.shape:
        raise ValueError(f"expert_ids {tuple(ids.shape)} and weights {tuple(w.shape)} must have the same shape")
    return ids, w

def as_routing(routing: RoutingLike, num_experts: int, num_tokens: int) -> Routing:
    """Accept a prepared Routing or an (expert_ids, weights) pair; check it fits the layer."""
    if isinstance(routing, Routing):
        r = routing
    elif isinstance(routing, (tuple, list)) and len(routing) == 2:
        r = Routing.prepare(routing[0], routing[1], num_experts)
    else:
        raise TypeError("routing must be (expert_ids, weights) or a grouter.nn.Routing")
    if r.num_experts != num_experts:
        raise ValueError(f"routing was planned for {r.num_experts} experts, the layer has {num_experts}")
    if r.expert_ids.shape[0] != num_tokens:
        raise ValueError(f"routing covers {r.expert_ids.shape[0]} tokens, the input has {num_tokens}")
    return r
