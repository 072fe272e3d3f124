"""MoE building blocks on the compiled dispatch ops: the MoE layer, experts, routers, routing."""

from .experts import Experts
from .moe import MoE
from .balance import expert_load, load_cv, max_vio
from .learned_routers import (SigmoidTopKRouter, SoftmaxTopKRouter, load_balancing_loss, router_z_loss,
                              update_router_biases)
from .attention import Attention
from .transformers_moe import moe_blocks
from .grouping import fold_groups
from .routing import Routing

__all__ = [
    "MoE", "Experts", "Attention", "fold_groups", "moe_blocks", "Routing",
    "SoftmaxTopKRouter", "SigmoidTopKRouter", "load_balancing_loss", "router_z_loss", "max_vio", "load_cv",
    "expert_load", "update_router_biases",
]
