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
all-to-all and, with a data-parallel mesh dimension, over the replicas in the backward of the
forward's own read of the weights: part of the computation, not a hook on Parameter objects, so
`to()`, `to_empty()`, `load_state_dict(assign=True)`, parametrizations and re-initialisation keep
it. A learned router's aux and z losses are its rank's shares of the global batch's terms (its
`aux_loss_group` is the layer's mesh). The dense parts are left to `fully_shard_dense` (FSDP2,
summing) or the user.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from .. import ops
from ..ops import expert_mlp
from ..nn.experts import Experts
from ..nn.moe import MoE
from ..nn.routing import Routing
from .dispatch import ParallelRouting, all_to_all, count_comm, group_info, same_on_all_ranks
from .placement import PlacementLike, check_expert_order, check_placement, contiguous_placement, short_ids

__all__ = ["ExpertParallelMoE"]

ParallelRoutingLike = Union[ParallelRouting, Routing, Tuple[Tensor, Tensor]]


class ExpertParallelMoE(nn.Module):
    """The experts of a `grouter.nn.MoE` spread over the ranks of a process group (expert parallelism).

    Each rank keeps the experts its placement gives it (`local_experts`); tokens travel to their
    experts' ranks and back with all-to-alls, planned once per step by a `ParallelRouting`.
    """

    def __init__(self, moe: MoE, group=None, placement: Optional[PlacementLike] = None, *,
                 mesh: Optional[DeviceMesh] = None, expert_order: Optional[Sequence[int]] = None):
        """mesh: a 1-D DeviceMesh of the expert-parallel ranks, or a 2-D one with dims named
        ("dp", "ep") (experts sharded over "ep", replicated over "dp"); or `group` (a process group,
        default: the world) for a 1-D mesh made from it. The mesh must span every rank: the global
        batch (`global_mean`, the routers' loss terms) is the whole world's.

        placement: row r lists the experts of the rank at mesh coordinate r along "ep".
        expert_order: the experts' numbering, as `Grouter.expert_order` records it (None: as
        distilled, 0..E-1); saved in `state_dict()` and checked when one is loaded, so a model
        trained on one numbering is never paired silently with routes of another."""
        super().__init__()
        with torch.device("cpu"):  # bookkeeping on the host, also inside `with torch.device("meta")`
            self._setup(moe, group, placement, mesh, expert_order)
        self._register_state_dict_hook(_state_dict_extras)
        self._register_load_state_dict_pre_hook(self._shard_full_tensors, with_module=False)

    def _setup(self, moe: MoE, group, placement: Optional[PlacementLike], mesh: Optional[DeviceMesh],
               expert_order: Optional[Sequence[int]]) -> None:
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
        group_rank, world = group_info(group)
        E = moe.num_experts
        self.group, self.world_size = group, world
        # The rank's place along "ep" is its mesh coordinate (what DTensor and DCP use), which
        # may differ from its rank in the process group when the mesh lists ranks out of order.
        self.rank = mesh.get_coordinate()[self.ep_dim]
        self._group_rank = group_rank
        self.hidden_size, self.num_experts, self.top_k = moe.hidden_size, E, moe.top_k
        problem = None
        try:
            placement = check_placement(contiguous_placement(E, world) if placement is None else placement, E, world)
            self.expert_order = check_expert_order(expert_order, E)
        except ValueError as e:
            problem = str(e)
        every = tuple(self.mesh.get_group(d) for d in range(self.mesh.ndim))  # the whole mesh, "dp" too
        if self.mesh.size() > 1:  # once per layer, and every rank agrees before any raises: none is left waiting
            device = _collective_device(group)
            shape = torch.tensor([E, moe.top_k, moe.hidden_size, moe.experts.intermediate_size, problem is not None])
            agreed = same_on_all_ranks(shape, device, every)
            if problem is not None:
                raise ValueError(problem)
            if not agreed:
                raise ValueError("the ranks wrap MoE layers of different sizes (num_experts, top_k, hidden or "
                                 "intermediate size), or another rank's placement or expert_order is invalid")
            if not same_on_all_ranks(torch.cat([placement.flatten(), self.expert_order]), device, every):
                raise ValueError("the ranks pass different placements or expert orders: every rank must use the same")
        elif problem is not None:
            raise ValueError(problem)
        self.placement = placement
        self.local_experts: List[int] = self.placement[self.rank].tolist()
        # The collectives index ranks by their rank in the group: the placement in that order.
        self._coords = _coordinates_by_group_rank(mesh, self.ep_dim, group)
        self._dispatch_placement = placement[self._coords]
        self.in_rank_order = bool(torch.equal(self._coords, torch.arange(world)))
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
            setattr(self.experts, name, param)
        self.mixed_precision = None  # an FSDP2 MixedPrecisionPolicy (fully_shard_dense sets it)
        self.router = moe.router  # replicated on every rank
        if self.router is not None and hasattr(self.router, "aux_loss_group"):
            self.router.aux_loss_group = self.mesh  # its loss terms: shares of the global batch's

    def _local_rows(self, full: Tensor) -> Tensor:
        return full.index_select(0, torch.tensor(self.local_experts, device=full.device))

    def _expert_weights(self) -> Tuple[Tensor, Tensor]:
        """This rank's expert weights as the expert MLP computes with them. Read from the current
        parameters at every forward; their gradient is summed over "dp" in this read's backward."""
        mp = self.mixed_precision
        compute = getattr(mp, "param_dtype", None) or self.experts.gate_up_proj.dtype
        reduce = getattr(mp, "reduce_dtype", None) or compute
        out = []
        for p in (self.experts.gate_up_proj, self.experts.down_proj):
            w = p.to_local() if isinstance(p, DTensor) else p
            if self.dp_group is not None and w.requires_grad:
                w = _SumOverGroup.apply(w.to(reduce), self.dp_group)
            out.append(w.to(compute))
        return out[0], out[1]

    def _shard_full_tensors(self, state_dict, prefix, *args) -> None:
        """Plain full [E, ...] expert tensors (a single-process MoE's state_dict) load as this rank's
        shards; a recorded expert numbering must be this layer's."""
        order = state_dict.pop(prefix + "expert_order", None)
        if order is not None and not torch.equal(torch.as_tensor(order).cpu().long(), self.expert_order):
            raise ValueError(f"this state_dict's experts are numbered {short_ids(order)} (expert_order), this layer's "
                             f"{short_ids(self.expert_order)}: build the layers with the checkpoint's numbering (route "
                             f"with grouter.parallel.renumber_experts(grouter, checkpoint_order))")
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
        if global_expert_ids is not None:  # given in mesh order along "ep"; the collectives use group order
            if len(global_expert_ids) == self.world_size:
                global_expert_ids = [global_expert_ids[c] for c in self._coords.tolist()]
        return ParallelRouting.prepare(expert_ids, weights, self._dispatch_placement, self.num_experts, self.group,
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
        gate_up, down = self._expert_weights()
        out = expert_mlp(rows, r.local_offsets, gate_up, down, self.experts.activation)
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
            if not torch.equal(routing.placement, self._dispatch_placement) or routing.rank != self._group_rank:
                raise ValueError("this ParallelRouting was prepared for another placement or rank")
            routing.check_unchanged()
        elif isinstance(routing, (tuple, list)) and len(routing) == 2:
            routing = self.prepare(*routing)
        else:
            raise TypeError("routing must be (expert_ids, weights), a grouter.nn.Routing or a ParallelRouting")
        if routing.expert_ids.shape[0] != tokens.shape[0]:
            raise ValueError(f"routing covers {routing.expert_ids.shape[0]} tokens, the input has {tokens.shape[0]}")
        return routing

    @property
    def aux_loss(self) -> Optional[Tensor]:
        """The learned router's load-balancing loss of the last forward: this rank's share."""
        return getattr(self.router, "aux_loss", None)

    @property
    def z_loss(self) -> Optional[Tensor]:
        return getattr(self.router, "z_loss", None)

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
    if mesh.get_coordinate() is None:
        raise ValueError(f"this rank ({dist.get_rank()}) is not in the mesh {mesh.mesh.tolist()}")
    if mesh.size() != dist.get_world_size():
        raise ValueError(f"ExpertParallelMoE's mesh spans {mesh.size()} of the {dist.get_world_size()} ranks "
                         f"({mesh.mesh.tolist()}): the global batch is every rank's, and a rank outside the mesh "
                         f"would get no gradient from it; on a ('dp', 'ep') world pass the 2-D mesh, not mesh['ep']")
    if mesh.ndim == 1:
        return mesh, 0, None
    names = mesh.mesh_dim_names or ()
    if mesh.ndim != 2 or "ep" not in names or "dp" not in names:
        raise ValueError(f"ExpertParallelMoE takes a 1-D DeviceMesh or a 2-D one with dims named ('dp', 'ep'), "
                         f"got {mesh.ndim}-D with names {names}")
    return mesh, names.index("ep"), mesh.get_group("dp")


def _state_dict_extras(module: "ExpertParallelMoE", state_dict, prefix, local_metadata) -> None:
    # The experts are shards of a tensor in slot order; only for the contiguous placement is that
    # the model's expert order. Another order in a checkpoint would load as the wrong experts.
    if not module.contiguous:
        raise ValueError(_OUT_OF_ORDER.format("state_dict"))
    state_dict[prefix + "expert_order"] = module.expert_order.clone()  # which numbering the rows are in


class _SumOverGroup(torch.autograd.Function):
    """Identity forward; backward sums the gradient over a process group (the data-parallel replicas)."""

    @staticmethod
    def forward(ctx, w, group):
        ctx.group = group
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        count_comm(dp_grad_bytes=grad.numel() * grad.element_size())
        return grad, None


def _coordinates_by_group_rank(mesh: DeviceMesh, dim: int, group) -> Tensor:
    """LongTensor [W]: the mesh coordinate along `dim` of each rank of `group`, by group rank."""
    me = dist.get_rank()
    along = mesh.mesh.movedim(dim, -1).reshape(-1, mesh.size(dim))
    row = next(r for r in along.tolist() if me in r)  # this rank's line of the mesh along `dim`
    coords = torch.empty(len(row), dtype=torch.long)
    for c, global_rank in enumerate(row):
        coords[dist.get_group_rank(group, global_rank)] = c
    return coords


_OUT_OF_ORDER = ("{} of an ExpertParallelMoE with a non-contiguous placement would list its experts out of "
                 "order: train with the contiguous placement of a relabelled Grouter "
                 "(grouter.parallel.relabel_experts), or load plain full [E, ...] tensors")
