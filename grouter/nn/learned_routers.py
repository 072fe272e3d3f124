"""Learned routers, the baselines a fixed Grouter is compared with.

- `SoftmaxTopKRouter`: softmax over a linear gate, top-k, optional renormalisation of the k
  weights; exposes the Switch/GShard load-balancing loss and the router z-loss of its last
  forward as `aux_loss` and `z_loss` for the training loop to add.
- `SigmoidTopKRouter`: DeepSeek-V3 style sigmoid scores; an expert bias, moved after every
  training forward towards equal load (not learned by gradient), shifts which experts are chosen
  but not their weights: auxiliary-loss-free balancing.

Both take tokens [T, H] and return (expert_ids [T, K] int64, weights [T, K]).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


__all__ = ["SoftmaxTopKRouter", "SigmoidTopKRouter", "load_balancing_loss", "router_z_loss"]


def load_balancing_loss(probs: Tensor, expert_ids: Tensor, num_experts: int) -> Tensor:
    """Switch/GShard auxiliary loss E * sum_i f_i * P_i (1 when perfectly balanced).

    f_i: fraction of the T*K routed slots that went to expert i; P_i: mean router probability of i.
    """
    counts = torch.bincount(expert_ids.reshape(-1), minlength=num_experts).to(probs.dtype)
    f = counts / max(expert_ids.numel(), 1)
    return num_experts * (f * probs.mean(0)).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE's z-loss: mean squared log-partition, keeps router logits small."""
    return torch.logsumexp(logits, dim=-1).square().mean()


class SoftmaxTopKRouter(nn.Module):
    """A learned top-k router: softmax over expert logits, the top k (renormalised by default).

    forward(tokens [T, H]) -> (expert_ids [T, K], weights [T, K]); keeps `logits`, the Switch/GShard
    `aux_loss` and the ST-MoE `z_loss` of that call for the training loss.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, renormalize: bool = True,
                 device=None, dtype=None):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, device=device, dtype=dtype))
        nn.init.normal_(self.weight, std=0.02)
        self.aux_loss: Optional[Tensor] = None
        self.z_loss: Optional[Tensor] = None
        self.logits: Optional[Tensor] = None  # of the last forward (grouter.distill reads them)
        self.last_ids: Optional[Tensor] = None

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        logits = F.linear(x, self.weight).float()
        self.logits = logits
        probs = logits.softmax(dim=-1)
        weights, ids = probs.topk(self.top_k, dim=-1)
        self.last_ids = ids
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        self.aux_loss = load_balancing_loss(probs, ids, self.num_experts)
        self.z_loss = router_z_loss(logits)
        return ids, weights.to(x.dtype)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}, renormalize={self.renormalize}"


class SigmoidTopKRouter(nn.Module):
    """DeepSeek-V3's aux-loss-free router: sigmoid scores, top k chosen with a per-expert bias.

    The bias (a buffer) moves towards equal load by `bias_update_rate` per training forward, not by
    gradient; weights are the chosen experts' unbiased scores, normalised, times `scaling`.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, bias_update_rate: float = 1e-3,
                 scaling: float = 1.0, device=None, dtype=None):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.num_experts, self.top_k = num_experts, top_k
        self.bias_update_rate, self.scaling = bias_update_rate, scaling
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, device=device, dtype=dtype))
        nn.init.normal_(self.weight, std=0.02)
        self.register_buffer("expert_bias", torch.zeros(num_experts, device=device))
        self.aux_loss: Optional[Tensor] = None  # none: balance comes from the bias
        self.z_loss: Optional[Tensor] = None
        self.logits: Optional[Tensor] = None
        self.last_ids: Optional[Tensor] = None

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        self.logits = F.linear(x, self.weight).float()
        scores = self.logits.sigmoid()
        ids = (scores + self.expert_bias).topk(self.top_k, dim=-1).indices  # the bias picks, not weighs
        self.last_ids = ids
        weights = scores.gather(1, ids)
        weights = self.scaling * weights / weights.sum(dim=-1, keepdim=True)
        if self.training and self.bias_update_rate > 0:
            self.update_bias(ids)
        return ids, weights.to(x.dtype)

    @torch.no_grad()
    def update_bias(self, expert_ids: Tensor) -> None:
        """Raise the bias of under-loaded experts and lower it for over-loaded ones (sign rule)."""
        load = torch.bincount(expert_ids.reshape(-1), minlength=self.num_experts).float()
        self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}, bias_update_rate={self.bias_update_rate}"
