"""Routing metrics: load balance (MaxVio, coefficient of variation), agreement, entropy."""

from __future__ import annotations

from typing import Iterable, List

import torch
from torch import Tensor

from ..nn.balance import expert_load, load_cv, max_vio

__all__ = ["expert_load", "max_vio", "load_cv", "routing_entropy", "routing_consistency", "batch_max_vio",
           "routed_max_vio"]


@torch.no_grad()
def routed_max_vio(g, batches: Iterable[Tensor]) -> float:
    """MaxVio of Grouter g's routes over all `batches` together (one load count, not a mean of
    per-batch figures); batches move to g's device."""
    device = next(g.parameters()).device
    ids = [g.route(b.to(device))[0].reshape(-1, g.top_k).cpu() for b in batches]
    return max_vio(torch.cat(ids) if ids else torch.empty(0, g.top_k, dtype=torch.int64), g.num_experts)


def batch_max_vio(g, batches: Iterable[Tensor]) -> List[float]:
    """MaxVio of each batch's routes under Grouter g."""
    return [max_vio(g.route(b)[0], g.num_experts) for b in batches]


def routing_entropy(logits: Tensor) -> float:
    """Mean entropy (nats) of the per-token softmax over experts."""
    logp = logits.float().log_softmax(-1)
    return float(-(logp.exp() * logp).sum(-1).mean())


@torch.no_grad()
def routing_consistency(g1, g2, batches: Iterable[Tensor]) -> float:
    """Mean fraction of a token's top-k experts that two Grouters (or checkpoints) share."""
    shared, total = 0.0, 0
    for b in batches:
        a, c = g1.route(b)[0], g2.route(b)[0]
        k = a.shape[-1]
        overlap = (a.unsqueeze(-1) == c.unsqueeze(-2)).any(-1).sum(-1).double() / k
        shared += float(overlap.sum())
        total += overlap.numel()
    return shared / max(total, 1)
