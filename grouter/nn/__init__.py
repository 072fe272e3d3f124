"""MoE building blocks on the compiled dispatch ops: the MoE layer, experts, routers, routing."""

from .experts import ACTIVATIONS, Experts, expert_mlp, glu
from .moe import MoE, prepare_routing
from .routers import SigmoidTopKRouter, SoftmaxTopKRouter, load_balancing_loss, max_violation, router_z_loss
from .routing import Routing, plan_builds, plan_for

__all__ = [
    "MoE", "Experts", "expert_mlp", "glu", "ACTIVATIONS", "Routing", "prepare_routing", "plan_for", "plan_builds",
    "SoftmaxTopKRouter", "SigmoidTopKRouter", "load_balancing_loss", "router_z_loss", "max_violation",
]
