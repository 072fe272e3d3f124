"""`ExpertParallelMoE`: a grouter.nn.MoE whose experts are spread over the ranks of a process group.

    permute by destination rank -> all-to-all -> reorder by local expert -> expert MLPs
    -> reorder back -> all-to-all back -> weighted combine (unpermute) on the token's rank

The experts are DTensors sharded on the expert dimension of the full `[E, ...]` weights over the
expert-parallel dimension of a DeviceMesh (replicated over a data-parallel dimension, if the mesh
has one): `state_dict()` is the single-process MoE's, so torch.distributed.checkpoint saves each
expert once and loads it on any number of ranks, and `clip_grad_norm_` sees the global norm. A
rank's output equals what the single-process MoE returns for that rank's tokens.

Gradients follow one convention: each rank's loss is its share of the global batch's mean (its
tokens' summed loss divided by the global token count, `global_mean`), and every gradient is the
sum over ranks. An expert's gradient sums over the expert-parallel ranks' tokens through the
all-to-all and, with a data-parallel mesh dimension, is all-reduced (summed) over it in backward;
the dense parts (router included) are left to `fully_shard_dense` (FSDP2, summing) or the user.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from .. import ops
from ..nn.expert_mlp_op import expert_mlp
from ..nn.experts import Experts
from ..nn.moe import MoE
from ..nn.routing import Routing
from .dispatch import ParallelRouting, all_to_all, count_comm, group_info, same_on_all_ranks
from .placement import PlacementLike, check_placement, contiguous_placement

__all__ = ["ExpertParallelMoE"]

ParallelRoutingLike = Union[ParallelRouting, Routing, Tuple[Tensor, Tensor]]


class ExpertParallelMoE(nn.Module):
    """The experts of a `grouter.nn.MoE` spread over the ranks of a process group (expert parallelism).

    Each rank keeps the experts its placement gives it (`local_experts`); tokens travel to their
    experts' ranks and back with all-to-alls, planned once per step by a `ParallelRouting`.
    """

    def __init__(self, moe: MoE, group=None, placement: Optional[PlacementLike] = None, *,
                 mesh: Optional[DeviceMesh] = None):
        """mesh: a 1-D DeviceMesh of the expert-parallel ranks, or a 2-D one with dims named
        ("dp", "ep") (experts sharded over "ep", replicated over "dp"); or `group` (a process group,
        default: the world) for a 1-D mesh made from it."""
        super().__init__()
        device = moe.experts.gate_up_proj.device
        if mesh is not None and group is not None:
            raise ValueError("pass either a DeviceMesh (mesh=) or a process group (group=), not both")
        if mesh is None:
            group_info(group)  # raises unless torch.distributed is initialised
            group_or_world = group if group is not None else dist.group.WORLD
            mesh_type = device.type if device.type != "meta" else _collective_device(group_or_world).type
            mesh = DeviceMesh.from_group(group_or_world, mesh_type)
        self.mesh, self.ep_dim, self.dp_group = _split_mesh(mesh)
        group = mesh.get_group(self.ep_dim)
        rank, world = group_info(group)
        E = moe.num_experts
        self.group, self.rank, self.world_size = group, rank, world
        self.hidden_size, self.num_experts, self.top_k = moe.hidden_size, E, moe.top_k
        problem = None
        try:
            placement = check_placement(contiguous_placement(E, world) if placement is None else placement, E, world)
        except ValueError as e:
            problem = str(e)
        if world > 1:  # once per layer, and every rank agrees before any raises: none is left waiting
            device = _collective_device(group)
            shape = torch.tensor([E, moe.top_k, moe.hidden_size, moe.experts.intermediate_size, problem is not None])
            agreed = same_on_all_ranks(shape, device, group)
            if problem is not None:
                raise ValueError(problem)
            if not agreed:
                raise ValueError("the ranks wrap MoE layers of different sizes (num_experts, top_k, hidden or "
                                 "intermediate size), or another rank's placement is invalid")
            if not same_on_all_ranks(placement, device, group):
                raise ValueError("the ranks pass different placements: every rank must use the same one")
        elif problem is not None:
            raise ValueError(problem)
        self.placement = placement
        self.local_experts: List[int] = self.placement[rank].tolist()
        src = moe.experts
        # Built on the meta device (no initialisation, no draw from the global RNG), then given
        # this rank's slices of the MoE's weights, as shards of the full [E, ...] tensors.
        self.experts = Experts(len(self.local_experts), src.hidden_size, src.intermediate_size, src.activation,
                               device="meta")
        self.contiguous = bool(torch.equal(self.placement.flatten(), torch.arange(E)))
        self._placements = [Shard(0) if d == self.ep_dim else Replicate() for d in range(self.mesh.ndim)]
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(src, name)
            local = self._local_rows(full.detach())
            param = nn.Parameter(DTensor.from_local(local, self.mesh, self._placements, run_check=False),
                                 requires_grad=full.requires_grad)
            if self.dp_group is not None and param.requires_grad:
                param.register_hook(self._sum_over_dp)
            setattr(self.experts, name, param)
        self.router = moe.router  # replicated on every rank
        self._register_state_dict_hook(_check_state_dict_order)
        self._register_load_state_dict_pre_hook(self._shard_full_tensors, with_module=False)

    def _local_rows(self, full: Tensor) -> Tensor:
        return full.index_select(0, torch.tensor(self.local_experts, device=full.device))

    def _sum_over_dp(self, grad: Tensor) -> Tensor:
        """An expert's gradient from this data-parallel replica's tokens, summed over the replicas."""
        local = grad.to_local().clone()
        dist.all_reduce(local, group=self.dp_group)
        count_comm(dp_grad_bytes=local.numel() * local.element_size())
        return DTensor.from_local(local, self.mesh, self._placements, run_check=False)

    def _shard_full_tensors(self, state_dict, prefix, *args) -> None:
        """Plain full [E, ...] expert tensors (a single-process MoE's state_dict) load as this rank's shards."""
        for name in ("gate_up_proj", "down_proj"):
            key = f"{prefix}experts.{name}"
            value = state_dict.get(key)
            if isinstance(value, DTensor) and not self.contiguous:
                raise ValueError(_OUT_OF_ORDER.format("load_state_dict of DTensors"))
            if isinstance(value, Tensor) and not isinstance(value, DTensor) and value.shape[0] == self.num_experts:
                state_dict[key] = DTensor.from_local(self._local_rows(value), self.mesh, self._placements,
                                                     run_check=False)

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
        experts = self.experts
        out = expert_mlp(rows, r.local_offsets, experts.gate_up_proj.to_local(), experts.down_proj.to_local(),
                         experts.activation)
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


def _collective_device(group) -> torch.device:
    """Where this group's collectives run (the layer's own weights may be on the meta device)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _split_mesh(mesh: DeviceMesh) -> Tuple[DeviceMesh, int, Optional[dist.ProcessGroup]]:
    """(mesh, its expert-parallel dim, the data-parallel group or None)."""
    if mesh.ndim == 1:
        return mesh, 0, None
    names = mesh.mesh_dim_names or ()
    if mesh.ndim != 2 or "ep" not in names or "dp" not in names:
        raise ValueError(f"ExpertParallelMoE takes a 1-D DeviceMesh or a 2-D one with dims named ('dp', 'ep'), "
                         f"got {mesh.ndim}-D with names {names}")
    return mesh, names.index("ep"), mesh.get_group("dp")


def _check_state_dict_order(module: "ExpertParallelMoE", state_dict, prefix, local_metadata) -> None:
    # The experts are shards of a tensor in slot order; only for the contiguous placement is that
    # the model's expert order. Another order in a checkpoint would load as the wrong experts.
    if not module.contiguous:
        raise ValueError(_OUT_OF_ORDER.format("state_dict"))


_OUT_OF_ORDER = ("{} of an ExpertParallelMoE with a non-contiguous placement would list its experts out of "
                 "order: train with the contiguous placement of a relabelled Grouter "
                 "(grouter.parallel.relabel_experts), or load plain full [E, ...] tensors")
