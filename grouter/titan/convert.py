"""`convert(model, grouter)`: every MoE layer of a torchtitan model routes by a fixed Grouter.

Run it on the built model before ``parallelize`` and before the optimizer is built (where
torchtitan runs its own model converters); it also works on a parallelized model (an EP mesh
already wired to a dispatcher is kept) and on a meta-device model (no parameter is created or
copied: the experts keep their parameters, the gates are removed).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torchtitan.models.common.moe import MoE, GroupedExperts, TokenChoiceTopKRouter
from torchtitan.models.common.token_dispatcher import AllToAllTokenDispatcher, LocalTokenDispatcher

from ..nn.moe import MoE as GrouterMoE
from .modules import FixedRouter, GrouterExperts, GrouterTokenDispatcher
from .routes import StepRoutes

__all__ = ["convert", "moe_layers", "as_grouter_moe", "EXPERT_DTYPES"]

EXPERT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what grouter.ops.expert_mlp computes


def moe_layers(model: nn.Module) -> "list[tuple[str, MoE]]":
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


def as_grouter_moe(moe: MoE) -> GrouterMoE:
    """The routed experts of a torchtitan MoE layer as a `grouter.nn.MoE` (router=None: routes are
    given to its forward), holding copies of the weights in grouter's layout: ``gate_up_proj`` =
    [w1_EFD | w3_EFD] on dim 1, ``down_proj`` = w2_EDF (sharded experts are gathered). Shared
    experts are not part of it. For comparing a converted model with grouter's own layer, or moving
    weights between the two."""
    inner = moe.routed_experts.inner_experts
    w1, w2, w3 = (w.full_tensor() if isinstance(w, DTensor) else w for w in (inner.w1_EFD, inner.w2_EDF, inner.w3_EFD))
    E, F, D = w1.shape
    K = moe.router.top_k
    out = GrouterMoE(D, F, E, K, router=None, device=w1.device, dtype=w1.dtype)
    with torch.no_grad():
        out.experts.gate_up_proj.copy_(torch.cat([w1, w3], dim=1))
        out.experts.down_proj.copy_(w2)
    return out


def convert(model: nn.Module, grouter: Optional[nn.Module] = None, *, experts: bool = True) -> nn.Module:
    """Make every torchtitan MoE layer of `model` route by `grouter` (frozen; or only by routes given
    per step when None: `set_routes`, or a `PredispatchedDataset` batch). In place; returns model.

    Each layer gets a `FixedRouter` (its gate is removed, so no router parameter reaches the
    optimizer or the checkpoint), no expert-bias load balancing (``load_balance_coeff = None``: the
    routes are fixed), grouter's token dispatcher, and - with `experts` and where the experts are
    torchtitan's ``GroupedExperts`` in float32/bfloat16/float16 - grouter's expert MLP on the same
    parameters. Raises if the model has no MoE layer, if a layer's experts or top-k differ from the
    Grouter's, or if a layer's dispatcher is one whose all-to-all grouter cannot feed (DeepEP,
    HybridEP, ...): those would silently route by something else.
    """
    layers = moe_layers(model)
    if not layers:
        raise ValueError("grouter.titan.convert: the model has no torchtitan MoE layer")
    if isinstance(getattr(model, "grouter_routes", None), StepRoutes):
        raise ValueError("grouter.titan.convert: the model is already converted")
    shapes = {(m.routed_experts.inner_experts.num_experts, _top_k(name, m)) for name, m in layers}
    if len(shapes) != 1:
        raise ValueError(f"grouter.titan.convert: the MoE layers differ in (experts, top_k): {sorted(shapes)}; "
                         "one Grouter routes every layer the same way")
    E, K = shapes.pop()
    if grouter is not None and (grouter.num_experts, grouter.top_k) != (E, K):
        raise ValueError(f"grouter.titan.convert: the Grouter routes to E={grouter.num_experts} K={grouter.top_k}, "
                         f"the model's MoE layers have E={E} K={K} (fold or re-distil it)")
    for name, m in layers:
        dispatcher = m.routed_experts.token_dispatcher
        if type(dispatcher) not in (LocalTokenDispatcher, AllToAllTokenDispatcher):
            raise ValueError(f"grouter.titan.convert: {name} uses {type(dispatcher).__name__}; grouter feeds "
                             "torchtitan's local and all-to-all dispatchers only (comm_backend='standard')")
    if grouter is not None:
        grouter.requires_grad_(False).eval()
    routes = StepRoutes(grouter, E, K)
    for name, m in layers:
        _convert_layer(m, routes, E, K, experts)
    model.grouter_routes = routes
    model.register_forward_pre_hook(routes.begin, with_kwargs=True)
    return model


def _top_k(name: str, m: MoE) -> int:
    router = m.router
    if isinstance(router, FixedRouter):
        raise ValueError(f"grouter.titan.convert: {name} is already converted")
    if not isinstance(router, TokenChoiceTopKRouter):
        raise ValueError(f"grouter.titan.convert: {name} has a {type(router).__name__} router; expected "
                         "torchtitan's TokenChoiceTopKRouter")
    return router.top_k


def _convert_layer(m: MoE, routes: StepRoutes, E: int, K: int, experts: bool) -> None:
    m.router = FixedRouter(routes, E, K)
    # The expert bias steers a learned router toward balance; a fixed router has nothing to steer.
    # None also makes torchtitan's optimizer hook skip these layers.
    m.load_balance_coeff = None
    if "expert_bias_E" in m._buffers:
        del m._buffers["expert_bias_E"]
    m.expert_bias_E = None
    old = m.routed_experts.token_dispatcher
    new = GrouterTokenDispatcher(AllToAllTokenDispatcher.Config(num_experts=E, top_k=K), routes)
    if getattr(old, "ep_mesh", None) is not None:
        new.wire_meshes(ep_mesh=old.ep_mesh)
    m.routed_experts.token_dispatcher = new
    routes.dispatchers.append(new)
    inner = m.routed_experts.inner_experts
    if experts and type(inner) is GroupedExperts and inner.w1_EFD.dtype in EXPERT_DTYPES:
        inner.__class__ = GrouterExperts  # same parameters, hooks and init; another forward
