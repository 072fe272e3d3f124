"""MoE building blocks on the compiled dispatch ops: the MoE layer, experts, routers, routing."""

from .expert_mlp_op import ACTIVATIONS, expert_mlp, glu
from .experts import Experts
from .moe import MoE, prepare_routing
from .routers import SigmoidTopKRouter, SoftmaxTopKRouter, load_balancing_loss, max_violation, router_z_loss
from .blocks import moe_blocks
from .routing import Routing

__all__ = [
    "MoE", "Experts", "moe_blocks", "expert_mlp", "glu", "ACTIVATIONS", "Routing", "prepare_routing",
    "SoftmaxTopKRouter", "SigmoidTopKRouter", "load_balancing_loss", "router_z_loss", "max_violation",
]
