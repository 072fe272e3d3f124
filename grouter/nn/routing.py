"""A top-k routing ready for dispatch: expert ids, gate weights and their routing plan.

With fixed routing (a Grouter) every MoE layer of a model routes the same tokens the same way, so
the plan is built once per forward pass and handed to each layer: `Routing.prepare` does that.
Sharing is explicit (the caller holds the Routing), never a cache keyed on tensor identity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import torch
from torch import Tensor

from .. import ops

__all__ = ["Routing", "RoutingLike", "flatten_routing", "as_routing", "checked_routes"]


@dataclass(frozen=True)
class Routing:
    """expert_ids [T, K], weights [T, K] and the RoutingPlan of expert_ids.

    Build it with `Routing.prepare`. Constructed directly, the plan is checked against the ids
    (shapes, and that every row sits in its expert's slice): a plan of other ids is refused.
    """

    expert_ids: Tensor
    weights: Tensor
    plan: ops.RoutingPlan
    planned_here: bool = field(default=False, repr=False, compare=False)

    def __post_init__(self):
        if self.expert_ids.dim() != 2 or self.weights.shape != self.expert_ids.shape:
            raise ValueError(f"Routing: expert_ids {tuple(self.expert_ids.shape)} and weights "
                             f"{tuple(self.weights.shape)} must both be [T, K]")
        if tuple(self.plan.row_of.shape) != tuple(self.expert_ids.shape):
            raise ValueError(f"Routing: the plan covers {tuple(self.plan.row_of.shape)} slots, the ids "
                             f"{tuple(self.expert_ids.shape)}")
        if not self.planned_here:
            check_plan_matches(self.expert_ids, self.plan)
        object.__setattr__(self, "_versions", versions_of(self._tensors()))

    def _tensors(self):
        return (self.expert_ids, *self.plan)

    def check_unchanged(self) -> None:
        """Raise ValueError if the ids or the plan were changed in place since the Routing was made
        (a plan edited in place would send rows through the wrong experts, silently).

        By the tensors' version counters; inference tensors have none, so there the plan is
        checked against the ids instead (on the CPU, and on CUDA while checks are on: it syncs)."""
        if self._versions is not None:
            if versions_of(self._tensors()) != self._versions:
                raise ValueError("this Routing's expert ids or plan were changed in place after it was prepared: "
                                 "prepare a new Routing (Routing.prepare) from the new routes")
        elif not torch.compiler.is_compiling() and untracked_needs_check(self.expert_ids):
            try:
                check_plan_matches(self.expert_ids, self.plan)
            except ValueError as e:
                raise ValueError(f"this Routing's expert ids or plan were changed in place after it was prepared "
                                 f"({e}): prepare a new Routing (Routing.prepare) from the new routes") from None

    @classmethod
    def prepare(cls, expert_ids: Tensor, weights: Tensor, num_experts: int) -> "Routing":
        """Flatten leading dims to tokens and build the plan (once, for every layer that uses it)."""
        ids, w = flatten_routing(expert_ids, weights)
        return cls(ids, w, ops.routing_plan(ids, num_experts), planned_here=True)

    @property
    def num_experts(self) -> int:
        return self.plan.num_experts

    @property
    def top_k(self) -> int:
        return self.expert_ids.shape[1]


RoutingLike = Union[Routing, "tuple[Tensor, Tensor]"]


def versions_of(tensors):
    """The tensors' version counters (bumped by every in-place write); None where not tracked
    (inference tensors) or while compiling."""
    if torch.compiler.is_compiling() or any(t.is_inference() for t in tensors):
        return None
    return tuple(t._version for t in tensors)


def untracked_needs_check(t: Tensor) -> bool:
    """Whether a routing without version counters is checked by content at use: on the CPU always,
    on CUDA only while grouter's checks are on (the check synchronises)."""
    return t.device.type != "cuda" or ops.cuda_checks_enabled()


def check_plan_matches(expert_ids: Tensor, plan: ops.RoutingPlan) -> None:
    """Every slot's row lies in the slice of its expert, and the offsets tile all T*K rows."""
    offsets = plan.expert_offsets
    n = expert_ids.numel()
    if offsets.dim() != 1 or int(offsets[0]) != 0 or int(offsets[-1]) != n or bool((offsets.diff() < 0).any()):
        raise ValueError(f"Routing: the plan's expert offsets do not tile the {n} routed rows")
    rows = plan.row_of.reshape(-1).long()
    if n and (int(rows.min()) < 0 or int(rows.max()) >= n):
        raise ValueError("Routing: the plan's rows fall outside [0, T*K)")
    expert_of_row = torch.searchsorted(offsets, rows, right=True) - 1
    if not torch.equal(expert_of_row, expert_ids.reshape(-1).long().to(expert_of_row.device)):
        raise ValueError("Routing: the plan was not built from these expert ids (rows in other experts' slices)")


def flatten_routing(expert_ids: Tensor, weights: Tensor) -> "tuple[Tensor, Tensor]":
    """(expert_ids, weights) [..., K] -> [T, K] each; raises ValueError unless their shapes agree."""
    ids = expert_ids if expert_ids.dim() == 2 else expert_ids.reshape(-1, expert_ids.shape[-1])
    w = weights if weights.dim() == 2 else weights.reshape(-1, weights.shape[-1])
    if ids.shape != w.shape:
        raise ValueError(f"expert_ids {tuple(ids.shape)} and weights {tuple(w.shape)} must have the same shape")
    return ids, w

def checked_routes(expert_ids: Tensor, weights: Tensor, who: str) -> "tuple[Tensor, Tensor]":
    """Routes handed in from outside (pre-dispatched, or computed elsewhere), flattened to [T, K]:
    integer ids, and weights that are finite and non-negative (gate weights are a distribution's
    mass: anything else would mix expert outputs with it silently). One check, one host sync."""
    if expert_ids.dtype.is_floating_point or expert_ids.dtype == torch.bool:
        raise ValueError(f"{who}: expert ids must be an integer tensor, got {expert_ids.dtype}")
    if not weights.dtype.is_floating_point:
        raise ValueError(f"{who}: weights must be a floating-point tensor, got {weights.dtype}")
    ids, w = flatten_routing(expert_ids, weights)
    if w.numel() and not bool((torch.isfinite(w) & (w >= 0)).all()):
        bad = w[~(torch.isfinite(w) & (w >= 0))]
        raise ValueError(f"{who}: gate weights must be finite and non-negative, got "
                         f"{bad.flatten()[:4].tolist()}{' ...' if bad.numel() > 4 else ''}")
    return ids, w


def as_routing(routing: RoutingLike, num_experts: int, num_tokens: int) -> Routing:
    """Accept a prepared Routing or an (expert_ids, weights) pair; check it fits the layer."""
    if isinstance(routing, Routing):
        r = routing
        r.check_unchanged()
    elif isinstance(routing, (tuple, list)) and len(routing) == 2:
        r = Routing.prepare(routing[0], routing[1], num_experts)
    else:
        raise TypeError("routing must be (expert_ids, weights) or a grouter.nn.Routing")
    if r.num_experts != num_experts:
        raise ValueError(f"routing was planned for {r.num_experts} experts, the layer has {num_experts}")
    if r.expert_ids.shape[0] != num_tokens:
        raise ValueError(f"routing covers {r.expert_ids.shape[0]} tokens, the input has {num_tokens}")
    return r
