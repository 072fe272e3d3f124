"""`grouter.nn.MoE`: a mixture-of-experts layer on the compiled dispatch ops.

    permute (one row per routed slot, expert-major) -> expert MLPs on contiguous slices
    -> unpermute (weighted combine back to tokens)

Routing is either learned (`router="softmax"`, `"sigmoid"` or a router module) or fixed and given
to `forward` as `(expert_ids, weights)` or a prepared `grouter.nn.Routing`, which carries a
routing plan built once and shared by every layer of the model.
"""

from __future__ import annotations

from typing import Optional, Union

from torch import Tensor, nn

from .. import ops
from .experts import Experts
from .learned_routers import SigmoidTopKRouter, SoftmaxTopKRouter
from .routing import RoutingLike, as_routing

__all__ = ["MoE"]

_ROUTERS = {"softmax": SoftmaxTopKRouter, "sigmoid": SigmoidTopKRouter}


class MoE(nn.Module):
    """A mixture-of-experts layer on grouter's dispatch ops: permute -> expert MLPs -> weighted unpermute.

    Routing is learned (`router="softmax"`, `"sigmoid"` or a module) or fixed: `forward(x,
    routing=(expert_ids, weights))` or a prepared `Routing` shared by every layer. Experts are
    stored as transformers v5 stores them (`experts.gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 router: Union[None, str, nn.Module] = None, activation: str = "silu", device=None, dtype=None):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.hidden_size, self.num_experts, self.top_k = hidden_size, num_experts, top_k
        if isinstance(router, str):
            if router not in _ROUTERS:
                raise ValueError(f"router must be one of {sorted(_ROUTERS)}, a module or None; got {router!r}")
            router = _ROUTERS[router](hidden_size, num_experts, top_k, device=device, dtype=dtype)
        self.router = router
        self.experts = Experts(num_experts, hidden_size, intermediate_size, activation, device=device, dtype=dtype)

    def forward(self, x: Tensor, routing: Optional[RoutingLike] = None) -> Tensor:
        """x [..., H] -> [..., H]. `routing`: fixed (expert_ids, weights) or Routing; else the router's."""
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"expected hidden size {self.hidden_size}, got input of shape {tuple(x.shape)}")
        tokens = x.reshape(-1, self.hidden_size)
        if routing is None:
            if self.router is None:
                raise ValueError("this MoE has no router (router=None): pass routing=(expert_ids, weights)")
            routing = self.router(tokens)
        r = as_routing(routing, self.num_experts, tokens.shape[0])
        rows = ops.permute(tokens, r.plan)
        rows = self.experts(rows, r.plan.expert_offsets)
        return ops.unpermute(rows, r.plan, r.weights).reshape(x.shape)

    @property
    def aux_loss(self) -> Optional[Tensor]:
        """The learned router's load-balancing loss of the last forward (None without one)."""
        return getattr(self.router, "aux_loss", None)

    @property
    def z_loss(self) -> Optional[Tensor]:
        return getattr(self.router, "z_loss", None)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}"
