"""Expert-parallel dispatch planned once per step: who sends how many rows to whom.

Experts are relabelled by their slot in the placement (rank-major: rank r hosts slots
r*E_loc .. (r+1)*E_loc - 1), so the routing plan of the relabelled ids is expert-major *and*
destination-major: `permute` then writes the all-to-all send buffer directly, rows for rank 0
first. A rank receives, from each source in turn, rows grouped by its local experts; a second plan
(one id per received row: its local expert) reorders them expert-major for the expert MLP and
back. Inside an expert, rows stay in ascending (source rank, token, k) order: exactly the rows,
in the same order, that the single-process MoE gives that expert when the global batch is the
ranks' tokens concatenated in rank order.

Split sizes come from per-(rank, expert) row counts. Routes known for the whole global batch
(pre-dispatched, on the host) give every count locally: no collective, no device-to-host copy.
Otherwise one all-to-all of counts; all MoE layers sharing a routing share the result.
"""

from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass, field, replace
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .. import ops
from ..nn.routing import check_plan_matches, flatten_routing, untracked_needs_check, versions_of
from .placement import PlacementLike, check_placement, contiguous_placement, slots

__all__ = ["ParallelRouting", "CommStats", "comm_stats", "reset_comm_stats", "all_to_all", "group_info", "count_comm"]


@dataclass
class CommStats:
    """What this process sent through grouter.parallel since the last reset."""

    all_to_alls: int = 0     # token all-to-alls (forward and backward)
    count_exchanges: int = 0  # all-to-alls of split counts
    bytes_sent: int = 0       # activation bytes sent to *other* ranks
    count_bytes_sent: int = 0
    route_checks: int = 0     # all-reduces checking that every rank planned from the same global routes
    dp_grad_bytes: int = 0    # expert-gradient bytes all-reduced over a data-parallel mesh dimension


class _Counters:
    """The process's CommStats behind a lock: layers of several threads may count at once."""

    def __init__(self):
        self._lock = threading.Lock()
        self._stats = CommStats()

    def add(self, **amounts: int) -> None:
        with self._lock:
            for name, amount in amounts.items():
                setattr(self._stats, name, getattr(self._stats, name) + amount)

    def read(self) -> CommStats:
        with self._lock:
            return replace(self._stats)

    def reset(self) -> None:
        with self._lock:
            self._stats = CommStats()


# Process-wide on purpose: the counters describe what this process sent, whichever layer sent it.
_counters = _Counters()


def comm_stats() -> CommStats:
    """A copy of this process's counters."""
    return _counters.read()


def reset_comm_stats() -> None:
    _counters.reset()


def count_comm(**amounts: int) -> None:
    """Add to this process's counters (the fields of CommStats)."""
    _counters.add(**amounts)


def group_info(group) -> tuple:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("grouter.parallel needs torch.distributed initialised (dist.init_process_group)")
    return dist.get_rank(group), dist.get_world_size(group)


def _exchange(x: Tensor, send: List[int], recv: List[int], group, rank: int) -> Tensor:
    out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
    _counters.add(all_to_alls=1, bytes_sent=(sum(send) - send[rank]) * math.prod(x.shape[1:]) * x.element_size())
    return out


class _AllToAll(torch.autograd.Function):
    """Rows split by `send` go out, rows split by `recv` come in; the gradient goes back the same way.

    `anchor` (an empty tensor that requires grad) keeps this node in the graph on every rank, even
    where the rows do not require grad, so every rank runs the backward collective: a rank that
    skipped it would leave the others waiting.
    """

    @staticmethod
    def forward(ctx, x, anchor, send, recv, group, rank):
        ctx.args = (send, recv, group, rank)
        return _exchange(x, send, recv, group, rank)

    @staticmethod
    def backward(ctx, grad):
        send, recv, group, rank = ctx.args
        return _exchange(grad, recv, send, group, rank), None, None, None, None, None


def all_to_all(x: Tensor, send: List[int], recv: List[int], group=None) -> Tensor:
    """Differentiable uneven all-to-all of the rows of x: send[i] rows to rank i, recv[i] from it."""
    rank, world = group_info(group)
    if len(send) != world or len(recv) != world or sum(send) != x.shape[0]:
        raise ValueError(f"all_to_all: {world} send and receive sizes needed, send summing to the {x.shape[0]} rows "
                         f"of x; got send={list(send)}, recv={list(recv)}")
    if torch.is_grad_enabled():
        anchor = torch.empty(0, device=x.device, requires_grad=True)
        return _AllToAll.apply(x, anchor, send, recv, group, rank)
    return _exchange(x, send, recv, group, rank)


@dataclass(frozen=True)
class ParallelRouting:
    """A routing of this rank's tokens, planned for expert parallelism (build with `prepare`).

    plan:          RoutingPlan of the slot-relabelled ids: the send layout, grouped by rank.
    send_splits:   rows sent to each rank; recv_splits: rows received from each rank.
    recv_plan:     RoutingPlan (K=1) of the received rows by local expert; None when the received
                   order is already expert-major (one local expert, or one rank).
    local_offsets: host list [E_loc + 1]: rows of local expert j, expert-major.
    """

    expert_ids: Tensor
    weights: Tensor
    plan: ops.RoutingPlan
    send_splits: List[int]
    recv_splits: List[int]
    recv_plan: Optional[ops.RoutingPlan]
    local_offsets: List[int]
    placement: Tensor
    rank: int
    exchanged_counts: bool = field(default=False)

    def __post_init__(self):
        object.__setattr__(self, "_snapshot", self._state())

    def _state(self):
        """What an in-place edit would change: the tensors' version counters and the host splits."""
        tensors = (self.expert_ids, *self.plan, *(self.recv_plan or ()), self.placement)
        return versions_of(tensors), tuple(self.send_splits), tuple(self.recv_splits), tuple(self.local_offsets)

    def check_unchanged(self) -> None:
        """Raise ValueError if the ids, plans, placement or splits were changed in place since
        `prepare` (rows would go to the wrong ranks or experts, silently)."""
        now, then = self._state(), self._snapshot
        changed = now[1:] != then[1:] or (now[0] is not None and then[0] is not None and now[0] != then[0])
        if not changed and now[0] is None and not torch.compiler.is_compiling() \
                and untracked_needs_check(self.expert_ids):
            # inference tensors have no version counters: the plan must still be the slot ids'
            slot_ids = slots(self.placement).to(self.expert_ids.device)[self.expert_ids.long()]
            try:
                check_plan_matches(slot_ids, self.plan)
            except ValueError:
                changed = True
        if changed:
            raise ValueError("this ParallelRouting was changed in place after it was prepared: prepare a new one "
                             "(ParallelRouting.prepare / ExpertParallelMoE.prepare) from the new routes")

    @property
    def num_experts(self) -> int:
        return self.placement.numel()

    @property
    def world_size(self) -> int:
        return self.placement.shape[0]

    @classmethod
    def prepare(cls, expert_ids: Tensor, weights: Tensor, placement: Optional[PlacementLike] = None,
                num_experts: Optional[int] = None, group=None,
                global_expert_ids: Optional[Sequence[Tensor]] = None,
                check: Optional[bool] = None) -> "ParallelRouting":
        """Plan this rank's routing (expert_ids / weights [..., K]) for expert parallelism.

        global_expert_ids: the expert ids of every rank's tokens, in rank order (this rank's
        equal to expert_ids), ideally host tensors, e.g. read from pre-dispatch files: all split
        sizes are then derived here without a collective. Without them, one all-to-all of counts.

        Ranks whose global routes disagree would exchange rows with split sizes that do not match
        (gloo then delivers garbage without an error). check=True verifies, with one small
        all-reduce, that every rank derived the same counts and raises ValueError otherwise;
        the default (None) checks the first such routing of the process only, True every one.
        """
        rank, world = group_info(group)
        if placement is None:
            if num_experts is None:
                raise ValueError("pass a placement or num_experts (for the contiguous placement)")
            placement = contiguous_placement(num_experts, world)
        p = torch.as_tensor(placement)
        E = p.numel() if num_experts is None else num_experts
        p = check_placement(p, E, world)
        ids, w = flatten_routing(expert_ids, weights)
        slot_of = slots(p)
        _check_ids(ids, E)
        plan = ops.routing_plan(slot_of.to(ids.device)[ids.long()].to(ids.dtype), E)
        if global_expert_ids is not None:  # split sizes known ahead: no collective, no device sync
            counts = _global_counts(global_expert_ids, ids, slot_of, rank, world)  # [W, E] on the host
            if world > 1:
                _check_same_counts(counts, ids.device, group, check)
            send, recv_counts = _splits_from_counts(counts, rank, world)
        else:
            send, recv_counts = _exchange_counts(plan, world, group)
        local_offsets = [0] + torch.cumsum(recv_counts.sum(0), 0).tolist()
        return cls(ids, w, plan, send.tolist(), recv_counts.sum(1).tolist(), _receive_plan(recv_counts, ids.device),
                   local_offsets, p, rank, exchanged_counts=global_expert_ids is None)


def _splits_from_counts(counts: Tensor, rank: int, world: int) -> Tuple[Tensor, Tensor]:
    """(rows this rank sends to each rank [W], rows it receives [W, E_loc] per sender and local
    expert), from every rank's per-expert counts [W, E] in slot order."""
    E_loc = counts.shape[1] // world
    return counts[rank].view(world, E_loc).sum(1), counts[:, rank * E_loc:(rank + 1) * E_loc]


def _exchange_counts(plan: ops.RoutingPlan, world: int, group) -> Tuple[Tensor, Tensor]:
    """The same splits from one all-to-all of this rank's per-expert counts (and one host copy)."""
    send_counts = plan.expert_offsets.diff()  # [E], slot order
    E_loc = send_counts.numel() // world
    recv_counts = torch.empty_like(send_counts)
    if world > 1:
        dist.all_to_all_single(recv_counts, send_counts, group=group)
        _counters.add(count_exchanges=1, count_bytes_sent=(world - 1) * E_loc * send_counts.element_size())
    else:
        recv_counts.copy_(send_counts)
    both = torch.stack([send_counts, recv_counts]).cpu()  # the one device-to-host copy
    return both[0].view(world, E_loc).sum(1), both[1].view(world, E_loc)


def _receive_plan(recv_counts: Tensor, device) -> Optional[ops.RoutingPlan]:
    """A K=1 plan that orders the received rows (grouped by sender, then local expert) by local
    expert; None when they already are (one rank, or one local expert)."""
    world, E_loc = recv_counts.shape
    if world == 1 or E_loc == 1:
        return None
    local_ids = torch.arange(E_loc).repeat(world).repeat_interleave(recv_counts.flatten())
    return ops.routing_plan(local_ids.view(-1, 1).to(device=device, dtype=torch.int32), E_loc)


def same_on_all_ranks(t: Tensor, device, group) -> bool:
    """Whether every rank of the group holds the same integer tensor t (same shape on all ranks).
    group: a process group, or a tuple of groups (e.g. a mesh's dimensions: all their ranks)."""
    flat = t.flatten().long()
    both = torch.cat([flat, -flat]).to(device)
    for g in group if isinstance(group, tuple) else (group,):
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=g)  # [max, -min] of each entry
    return torch.equal(both[:flat.numel()], -both[flat.numel():])


# Process groups whose ranks have checked once that they plan from the same global routes (the
# default check=None checks the first routing of each group). Weak keys: a destroyed group goes.
_checked_groups: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_checked_lock = threading.Lock()


def _check_same_counts(counts: Tensor, device, group, check: Optional[bool]) -> None:
    """Raise ValueError on every rank unless all ranks hold the same [W, E] counts (when asked)."""
    key = group if group is not None else dist.group.WORLD
    with _checked_lock:
        first = key not in _checked_groups
        if check or (check is None and first):
            _checked_groups[key] = True
        else:
            return
    _counters.add(route_checks=1)
    if not same_on_all_ranks(counts, device, group):
        raise ValueError("the ranks passed different global_expert_ids: every rank must plan from the same "
                         "routes of the whole global batch")


def _check_ids(ids: Tensor, E: int, distinct: bool = True) -> None:
    if ids.dim() != 2 or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"expert_ids must be int32 or int64 [T, K], got {ids.dtype} of shape {tuple(ids.shape)}")
    if ids.numel() and (not ids.is_cuda or ops.cuda_checks_enabled()):
        lo, hi = torch.aminmax(ids)
        if int(lo) < 0 or int(hi) >= E:
            raise IndexError(f"expert_ids holds ids in [{int(lo)}, {int(hi)}], outside [0, {E})")
        if not distinct:
            return
        # Checked here, in global ids: the plan sees slot ids, and its message would name slots.
        s = ids.sort(dim=1).values
        repeats = (s[:, 1:] == s[:, :-1]).any(dim=1)
        if bool(repeats.any()):
            t = int(repeats.nonzero()[0])
            raise ValueError(f"token {t} repeats an expert in its expert ids {ids[t].tolist()}; a token's K expert "
                             f"ids must be distinct")


def _global_counts(global_ids: Sequence[Tensor], ids: Tensor, slot_of: Tensor, rank: int, world: int) -> Tensor:
    """int64 [W, E]: rows each rank sends to each slot, from every rank's (host) expert ids."""
    if len(global_ids) != world:
        raise ValueError(f"global_expert_ids must hold one tensor per rank ({world}), got {len(global_ids)}")
    E = slot_of.numel()
    rows = []
    for r, g in enumerate(global_ids):
        g = torch.as_tensor(g).cpu()
        g = g.reshape(-1, ids.shape[1]) if g.numel() else g.reshape(0, ids.shape[1])
        # Split sizes that disagree with the plan would send the wrong rows: check what is cheap
        # (this rank's routes; on a GPU only their shape, comparing values would need a sync).
        if r == rank and (g.shape != ids.shape or (not ids.is_cuda and not torch.equal(g.long(), ids.long()))):
            raise ValueError(f"global_expert_ids[{rank}] ({tuple(g.shape)}) differs from this rank's expert_ids "
                             f"({tuple(ids.shape)}): it must be this rank's routes")
        _check_ids(g, E, distinct=False)  # in range for the count; each rank checks its own fully
        rows.append(torch.bincount(slot_of[g.long()].flatten(), minlength=E))
    return torch.stack(rows)
