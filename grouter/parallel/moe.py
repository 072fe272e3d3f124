"""`ExpertParallelMoE`: a grouter.nn.MoE whose experts are spread over the ranks of a process group.

    permute by destination rank -> all-to-all -> reorder by local expert -> expert MLPs
    -> reorder back -> all-to-all back -> weighted combine (unpermute) on the token's rank

Each rank keeps only its experts (same parameter names as the MoE, first dimension = local
experts). A rank's output equals what the single-process MoE returns for that rank's tokens; each
expert's gradient sums over every rank's tokens. The router (if any) is replicated: reduce its
gradients like any data-parallel weight.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .. import ops
from ..nn.experts import Experts
from ..nn.moe import MoE
from ..nn.routing import Routing
from .dispatch import ParallelRouting, group_info, all_to_all, same_on_all_ranks
from .placement import PlacementLike, check_placement, contiguous_placement

__all__ = ["ExpertParallelMoE"]

ParallelRoutingLike = Union[ParallelRouting, Routing, Tuple[Tensor, Tensor]]


class ExpertParallelMoE(nn.Module):
    """The experts of a `grouter.nn.MoE` spread over the ranks of a process group (expert parallelism).

    Each rank keeps the experts its placement gives it (`local_experts`); tokens travel to their
    experts' ranks and back with all-to-alls, planned once per step by a `ParallelRouting`.
    """

    def __init__(self, moe: MoE, group=None, placement: Optional[PlacementLike] = None):
        super().__init__()
        rank, world = group_info(group)
        E = moe.num_experts
        self.group, self.rank, self.world_size = group, rank, world
        self.hidden_size, self.num_experts, self.top_k = moe.hidden_size, E, moe.top_k
        self.placement = check_placement(contiguous_placement(E, world) if placement is None else placement, E, world)
        if world > 1:  # once per layer: ranks that disagree here would exchange garbage later
            device = moe.experts.gate_up_proj.device
            shape = torch.tensor([E, moe.top_k, moe.hidden_size, moe.experts.intermediate_size])
            if not same_on_all_ranks(shape, device, group):
                raise ValueError("the ranks wrap MoE layers of different sizes (num_experts, top_k, hidden or "
                                 "intermediate size)")
            if not same_on_all_ranks(self.placement, device, group):
                raise ValueError("the ranks pass different placements: every rank must use the same one")
        self.local_experts: List[int] = self.placement[rank].tolist()
        src = moe.experts
        # Built on the meta device (no initialisation, no draw from the global RNG), then given
        # this rank's slices of the MoE's weights.
        self.experts = Experts(len(self.local_experts), src.hidden_size, src.intermediate_size, src.activation,
                               device="meta")
        index = torch.tensor(self.local_experts, device=src.gate_up_proj.device)
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(src, name)
            local = full.detach().index_select(0, index)
            setattr(self.experts, name, nn.Parameter(local, requires_grad=full.requires_grad))
        self.router = moe.router  # replicated on every rank

    def prepare(self, expert_ids: Tensor, weights: Tensor, global_expert_ids: Optional[Sequence[Tensor]] = None,
                check: Optional[bool] = None) -> ParallelRouting:
        """Plan a routing once per step for every layer sharing it (see ParallelRouting.prepare)."""
        return ParallelRouting.prepare(expert_ids, weights, self.placement, self.num_experts, self.group,
                                       global_expert_ids, check)

    def forward(self, x: Tensor, routing: Optional[ParallelRoutingLike] = None) -> Tensor:
        """x [..., H] of this rank's tokens -> [..., H]. Every rank of the group must call it."""
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"expected hidden size {self.hidden_size}, got input of shape {tuple(x.shape)}")
        tokens = x.reshape(-1, self.hidden_size)
        r = self._routing(routing, tokens)
        send = ops.permute(tokens, r.plan)  # grouped by destination rank, then expert
        recv = all_to_all(send, r.send_splits, r.recv_splits, self.group)
        rows = recv if r.recv_plan is None else ops.permute(recv, r.recv_plan)
        out = self.experts(rows, r.local_offsets)
        back = out if r.recv_plan is None else ops.unpermute(out, r.recv_plan)
        ret = all_to_all(back, r.recv_splits, r.send_splits, self.group)
        return ops.unpermute(ret, r.plan, r.weights).reshape(x.shape)

    def _routing(self, routing: Optional[ParallelRoutingLike], tokens: Tensor) -> ParallelRouting:
        if routing is None:
            if self.router is None:
                raise ValueError("this MoE has no router (router=None): pass routing=(expert_ids, weights)")
            routing = self.router(tokens)
        if isinstance(routing, Routing):
            routing = (routing.expert_ids, routing.weights)
        if isinstance(routing, ParallelRouting):
            if not torch.equal(routing.placement, self.placement) or routing.rank != self.rank:
                raise ValueError("this ParallelRouting was prepared for another placement or rank")
        elif isinstance(routing, (tuple, list)) and len(routing) == 2:
            routing = self.prepare(*routing)
        else:
            raise TypeError("routing must be (expert_ids, weights), a grouter.nn.Routing or a ParallelRouting")
        if routing.expert_ids.shape[0] != tokens.shape[0]:
            raise ValueError(f"routing covers {routing.expert_ids.shape[0]} tokens, the input has {tokens.shape[0]}")
        return routing

    @property
    def aux_loss(self) -> Optional[Tensor]:
        return getattr(self.router, "aux_loss", None)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, top_k={self.top_k}, rank={self.rank}/{self.world_size}, "
                f"local_experts={self.local_experts}")
