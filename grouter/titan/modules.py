"""What a converted torchtitan MoE layer runs: a fixed router, grouter's dispatch, grouter's experts.

- `FixedRouter` replaces ``TokenChoiceTopKRouter``: it returns the step's routes (no gate, no
  parameters, no expert bias) in the router's ``(topk_scores, topk_expert_ids, scores)`` form.
- `GrouterTokenDispatcher` replaces the token dispatcher. Without expert parallelism it permutes
  with the step's routing plan and combines with ``grouter.ops.unpermute`` (weighted, summed in k
  order in fp32: bitwise reproducible, no atomics). Under expert parallelism it is torchtitan's
  ``AllToAllTokenDispatcher`` with the split sizes of the step taken from `StepRoutes` instead of a
  count all-to-all and a device-to-host sync in every layer.
- `GrouterExperts` is ``GroupedExperts`` computed by ``grouter.ops.expert_mlp`` in the dtype of its
  input (torchtitan's computes in bf16 always): the same parameters (``w1_EFD``, ``w2_EDF``,
  ``w3_EFD``), so checkpoints and optimizer state are unchanged by the conversion.

The rows a dispatcher hands the experts are in the order torchtitan's own gives them: expert-major,
inside an expert ascending (token, k) - a stable sort of the flat ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor
from torchtitan.distributed.spmd_types import current_spmd_mesh
from torchtitan.distributed.utils import get_spmd_backend
from torchtitan.models.common.moe import GroupedExperts
from torchtitan.models.common.token_dispatcher import AllToAllTokenDispatcher
from torchtitan.protocols.module import Module

from .. import ops
from .routes import StepRoutes

__all__ = ["FixedRouter", "GrouterTokenDispatcher", "GrouterExperts", "GrouterDispatchMetadata", "check_spmd_backend"]


def check_spmd_backend() -> None:
    """torchtitan's all-to-all reads its process group from the current SPMD mesh under the default
    "spmd_types" backend, which only its trainer sets: outside it the dispatch would fail deep inside."""
    if get_spmd_backend() == "spmd_types" and current_spmd_mesh() is None:
        raise RuntimeError("grouter.titan: expert-parallel dispatch under torchtitan's 'spmd_types' backend needs "
                           "its trainer's SPMD mesh; outside the trainer set parallelism.spmd_backend = "
                           "'partial_dtensor' (torchtitan.distributed.utils.set_spmd_backend('partial_dtensor'))")


class FixedRouter(Module):
    """The step's routes as a torchtitan router: scores_BLK, ids_BLK (int64) and scores_BLE (the
    gate weights at the chosen experts, 0 elsewhere). Ignores the expert bias (there is none)."""

    def __init__(self, routes: StepRoutes, num_experts: int, top_k: int):
        super().__init__()
        self.routes, self.num_experts, self.top_k = routes, num_experts, top_k

    def forward(self, x_BLD: Tensor, expert_bias_E: Tensor | None = None):
        B, L = x_BLD.shape[0], x_BLD.shape[1]
        r = self.routes.current(B * L)
        ids_BLK = r.expert_ids.view(B, L, self.top_k)
        scores_BLK = r.weights.view(B, L, self.top_k)
        scores_BLE = scores_BLK.new_zeros(B, L, self.num_experts).scatter_(-1, ids_BLK, scores_BLK)
        return scores_BLK, ids_BLK, scores_BLE

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}, fixed"


@dataclass(frozen=True, kw_only=True)
class GrouterDispatchMetadata:
    plan: ops.RoutingPlan
    weights: Tensor  # [T, K]


class GrouterTokenDispatcher(AllToAllTokenDispatcher):
    """grouter's permute / weighted unpermute at EP=1; torchtitan's all-to-all with the step's known
    splits under expert parallelism (wired like torchtitan's: ``wire_meshes(ep_mesh=...)``)."""

    def __init__(self, config: AllToAllTokenDispatcher.Config, routes: StepRoutes):
        super().__init__(config)
        self.routes = routes

    def dispatch(self, x_TD, topk_scores_TK, topk_expert_ids_TK, num_local_tokens_per_expert_E):
        if self.ep_mesh is None:
            plan = self.routes.plan_for(topk_expert_ids_TK)
            metadata = GrouterDispatchMetadata(plan=plan, weights=topk_scores_TK)
            return ops.permute(x_TD, plan), num_local_tokens_per_expert_E, metadata
        check_spmd_backend()
        if not self.routes.is_step_ids(topk_expert_ids_TK) or self.routes.splits is None:
            raise ValueError("grouter.titan: expert-parallel dispatch of routes other than the step's: the step's "
                             "all-to-all splits do not describe them")
        return super().dispatch(x_TD, topk_scores_TK, topk_expert_ids_TK, num_local_tokens_per_expert_E)

    def combine(self, routed_output_RD, metadata, x_TD):
        if isinstance(metadata, GrouterDispatchMetadata):
            return ops.unpermute(routed_output_RD, metadata.plan, metadata.weights)
        return super().combine(routed_output_RD, metadata, x_TD)

    # The two seams of AllToAllTokenDispatcher.dispatch that exchange and read back the counts.
    def _token_count_exchange(self, num_local_tokens_per_expert_E, pg, ep_size):
        return self.routes.splits.recv_counts.view(ep_size, -1)

    def _sync_token_count_exchange(self, num_local_tokens_per_expert_E, num_global_tokens_per_local_expert_EP_e,
                                   ep_size):
        s = self.routes.splits
        return num_global_tokens_per_local_expert_EP_e.reshape(-1), s.input_splits, s.output_splits


class GrouterExperts(GroupedExperts):
    """GroupedExperts (same parameters) computed by grouter.ops.expert_mlp in the input's dtype."""

    def forward(self, x_RD: Tensor, num_tokens_per_expert_E: Tensor) -> Tensor:
        w1, w2, w3 = (w.to_local() if isinstance(w, DTensor) else w for w in (self.w1_EFD, self.w2_EDF, self.w3_EFD))
        dtype = x_RD.dtype
        # [gate | up] as grouter stores it: w1 (gate) and w3 (up) are both [E, F, D].
        gate_up = torch.cat([w1.to(dtype), w3.to(dtype)], dim=1)
        counts = num_tokens_per_expert_E.to(torch.int64)
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return ops.expert_mlp(x_RD, offsets, gate_up, w2.to(dtype), "silu")
