"""The routes of one training step of a converted torchtitan model, shared by all its MoE layers.

A converted model owns one `StepRoutes` (``model.grouter_routes``). A forward pre-hook on the model
fills it before any layer runs, from (first found wins):

1. the batch: ``grouter_expert_ids`` / ``grouter_weights`` keyword arguments, which torchtitan's
   trainer passes on from the dataloader's ``input_dict`` (`PredispatchedDataset` puts them there)
   and the hook removes before the model sees them;
2. `set_routes(model, ids, weights)` for the next forward;
3. the attached Grouter, routing the forward's tokens.

With none of these the forward raises: a layer never reuses an earlier step's routes. The routing
plan is built once here and every layer's dispatcher uses it. Under expert parallelism the
all-to-all split sizes of the step are computed here too, once for all layers: from
``grouter_counts_by_rank`` when the batch carries every rank's counts (no collective at all), else
from one all-gather of the local counts (one collective and one device-to-host copy per step
instead of one of each per layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import ops
from ..nn.routing import Routing, checked_routes

__all__ = ["StepRoutes", "EPSplits", "set_routes", "routes_of", "BATCH_KEYS"]

# The dataloader keys (input_dict) a converted model takes its routes from.
IDS_KEY, WEIGHTS_KEY, COUNTS_KEY = "grouter_expert_ids", "grouter_weights", "grouter_counts_by_rank"
BATCH_KEYS = (IDS_KEY, WEIGHTS_KEY, COUNTS_KEY)


@dataclass(frozen=True)
class EPSplits:
    """One step's expert-parallel all-to-all sizes on this rank (host lists: no sync to read them).

    recv_counts: [EP * e] rows this rank receives, source rank-major, per local expert - the
    layout torchtitan's count all-to-all produces.
    """

    input_splits: List[int]
    output_splits: List[int]
    recv_counts: Tensor


class StepRoutes:
    """The step's Routing (ids, weights, plan) and, under EP, its all-to-all splits."""

    def __init__(self, grouter: Optional[nn.Module], num_experts: int, top_k: int):
        self.grouter, self.num_experts, self.top_k = grouter, num_experts, top_k
        self.routing: Optional[Routing] = None
        self.splits: Optional[EPSplits] = None
        self.pending: Optional[tuple] = None
        self.dispatchers: list = []  # the converted layers' token dispatchers (their EP mesh, once wired)
        # Per-process counts of what the step's routing cost: tests and benchmarks read them.
        self.plans_built = 0
        self.count_exchanges = 0

    # --- filled once per forward, before any layer --------------------------------------------------

    def begin(self, _module, args, kwargs):
        ids, weights, counts_by_rank = (kwargs.pop(key, None) for key in BATCH_KEYS)
        tokens = kwargs["tokens"] if "tokens" in kwargs else (args[0] if args else None)
        if not isinstance(tokens, Tensor) or tokens.is_floating_point() or tokens.dim() != 2:
            raise ValueError("grouter.titan: the converted model takes token ids [B, L] as its first argument "
                             "(a pipeline stage after the first cannot route: it has no tokens)")
        if (ids is None) != (weights is None):
            raise ValueError("grouter.titan: the batch carries only one of grouter_expert_ids and grouter_weights")
        if ids is None and self.pending is not None:
            ids, weights, counts_by_rank = self.pending
        self.pending = None
        if ids is None:
            if self.grouter is None:
                raise RuntimeError("grouter.titan: no routes for this forward: the batch has no grouter_expert_ids, "
                                   "set_routes was not called and no Grouter is attached")
            ids, weights = self.grouter.route(tokens)
        self.prepare(ids, weights, tokens, counts_by_rank)
        return args, kwargs

    def prepare(self, ids: Tensor, weights: Tensor, tokens: Tensor, counts_by_rank: Optional[Tensor] = None) -> None:
        """Check the routes against the forward's tokens [B, L], plan them (once), split them (EP)."""
        B, L = tokens.shape
        if tuple(ids.shape) not in ((B, L, self.top_k), (B * L, self.top_k)):
            raise ValueError(f"grouter.titan: routes {tuple(ids.shape)} do not cover the forward's tokens "
                             f"{(B, L)} with top_k={self.top_k}: expected {(B, L, self.top_k)}")
        ids, weights = checked_routes(ids, weights, "grouter.titan routes")
        ids = ids.to(tokens.device, torch.int64, non_blocking=True)
        weights = weights.to(tokens.device, torch.float32, non_blocking=True)
        self.routing = Routing.prepare(ids, weights, self.num_experts)  # range and duplicate checks: the op's
        self.plans_built += 1
        mesh = self.ep_mesh()
        self.splits = None if mesh is None else self._splits(mesh, counts_by_rank)

    def ep_mesh(self):
        meshes = {id(d.ep_mesh): d.ep_mesh for d in self.dispatchers if getattr(d, "ep_mesh", None) is not None}
        if len(meshes) > 1:
            raise ValueError("grouter.titan: the MoE layers are wired to different expert-parallel meshes; one "
                             "step's splits serve every layer, so they must share one")
        return next(iter(meshes.values()), None)

    def _splits(self, mesh, counts_by_rank: Optional[Tensor]) -> EPSplits:
        world, rank, E = mesh.size(), mesh.get_local_rank(), self.num_experts
        if E % world:
            raise ValueError(f"grouter.titan: {E} experts do not divide over {world} expert-parallel ranks")
        local = self.routing.plan.tokens_per_expert()
        if counts_by_rank is not None:
            # Every rank's counts came with the batch (summed over its samples): nothing to exchange.
            counts = getattr(counts_by_rank, "counts", counts_by_rank)  # HostCounts, or a tensor
            counts = counts.to("cpu", torch.int64)  # a device tensor: the step's one copy back
            counts = counts.sum(0) if counts.dim() == 3 else counts
            if tuple(counts.shape) != (world, E):
                raise ValueError(f"grouter.titan: grouter_counts_by_rank is {tuple(counts.shape)}, expected "
                                 f"[{world} ranks, {E} experts] (or [batch, {world}, {E}])")
            # This rank's row must count this rank's routes (a batch's counts of other samples
            # would size the all-to-alls wrongly). Asserted on the device: no host sync; the
            # other rows are each checked by their own rank.
            torch._assert_async((local == counts[rank].to(local.device, non_blocking=True)).all(),
                                f"grouter.titan: grouter_counts_by_rank[{rank}] does not count this rank's routes: "
                                "the batch's counts belong to other samples")
        else:
            gathered = local.new_empty(world * E)  # flat: gloo's all-gather wants [world * E]
            dist.all_gather_single(gathered, local, group=mesh.get_group())
            counts = gathered.view(world, E).cpu()  # the step's one device-to-host copy
            self.count_exchanges += 1
        e = E // world
        mine = counts[:, rank * e:(rank + 1) * e]
        return EPSplits(input_splits=counts[rank].view(world, e).sum(1).tolist(),
                        output_splits=mine.sum(1).tolist(),
                        recv_counts=mine.reshape(-1).to(local.device, non_blocking=True))

    # --- read by the layers -------------------------------------------------------------------------

    def current(self, num_tokens: int) -> Routing:
        r = self.routing
        if r is None:
            raise RuntimeError("grouter.titan: a converted MoE layer ran outside a forward of its model (no routes "
                               "for it): call the model, or StepRoutes.prepare first")
        if not torch.compiler.is_compiling():
            r.check_unchanged()
        if r.expert_ids.shape[0] != num_tokens:
            raise ValueError(f"grouter.titan: the step's routes cover {r.expert_ids.shape[0]} tokens, this MoE "
                             f"layer got {num_tokens}")
        return r

    def is_step_ids(self, ids: Tensor) -> bool:
        """Whether ids are (a view of) the step's ids: then the step's plan and splits describe them."""
        r = self.routing
        if r is None or ids.shape[0] != r.expert_ids.shape[0] or torch.compiler.is_compiling():
            return False
        return (ids.device == r.expert_ids.device and ids.numel() == r.expert_ids.numel()
                and ids.untyped_storage().data_ptr() == r.expert_ids.untyped_storage().data_ptr()
                and ids.storage_offset() == r.expert_ids.storage_offset())

    def plan_for(self, ids: Tensor) -> ops.RoutingPlan:
        """The step's plan for the step's ids; anything else is planned as given (always correct)."""
        return self.routing.plan if self.is_step_ids(ids) else ops.routing_plan(ids, self.num_experts)


def routes_of(model: nn.Module) -> StepRoutes:
    routes = getattr(model, "grouter_routes", None)
    if not isinstance(routes, StepRoutes):
        raise RuntimeError("grouter.titan: the model is not converted; call grouter.titan.convert(model, grouter) first")
    return routes


def set_routes(model: nn.Module, expert_ids: Tensor, weights: Tensor, counts_by_rank: Optional[Tensor] = None) -> None:
    """Routes for the next forward of a converted model: [B, L, K] (or [B*L, K]), checked against its
    tokens when it runs; they take precedence over the attached Grouter. Under expert parallelism,
    `counts_by_rank` [EP, E] (every rank's rows per expert this step, e.g. from the pre-dispatched
    global batch) makes the step's splits known without any exchange."""
    routes = routes_of(model)
    ids, w = checked_routes(expert_ids, weights, "grouter.titan.set_routes")
    routes.pending = (ids, w, counts_by_rank)
