"""The demo's byte-level MoE language model and the routings it is trained with.

Every run builds the same model from the same seed: embedding -> N blocks (causal attention,
then a grouter.nn.MoE in place of the MLP) -> RMSNorm -> head. What differs is the routing:

  learned_aux   a softmax top-k router per layer, trained with the load-balancing loss
  learned_bias  a sigmoid top-k router per layer with an aux-loss-free expert bias
  hash          a fixed, balanced table token id -> K experts
  grouter*      a frozen Grouter's routes, computed once per step and shared by all layers
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import MoE, Routing, SigmoidTopKRouter, SoftmaxTopKRouter
from ..nn.attention import Attention
from .corpus import VOCAB

AUX_LOSS_COEF = 0.01


class _Block(nn.Module):
    def __init__(self, d: int, n_heads: int, moe: MoE):
        super().__init__()
        self.attn = Attention(d, n_heads, causal=True)
        self.norm = nn.RMSNorm(d)
        self.moe = moe

    def forward(self, x: Tensor, routing: Optional[Routing]) -> Tensor:
        x = x + self.attn(x)
        return x + self.moe(self.norm(x), routing=routing)


class MoELM(nn.Module):
    def __init__(self, d_model: int, n_layers: int, n_heads: int, num_experts: int, top_k: int, d_expert: int,
                 seed: int, router: Optional[str] = None):
        super().__init__()
        torch.manual_seed(seed)  # the same weights for every routing of a seed
        self.num_experts, self.top_k = num_experts, top_k
        self.embed = nn.Embedding(VOCAB, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, n_heads, MoE(d_model, d_expert, num_experts, top_k))
                                    for _ in range(n_layers))
        self.norm = nn.RMSNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB, bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)
        if router is not None:  # drawn after the shared weights, from their own seed
            torch.manual_seed(seed + 7919)
            for block in self.blocks:
                block.moe.router = (SoftmaxTopKRouter if router == "softmax" else SigmoidTopKRouter)(
                    d_model, num_experts, top_k)
        self.load = torch.zeros(n_layers, num_experts, dtype=torch.float64)  # routed slots, over training
        self._hooks = [b.moe.register_forward_hook(self._count(i)) for i, b in enumerate(self.blocks)]
        self._routing: Optional[Routing] = None

    def _count(self, layer: int):
        def hook(module, args, out):
            if not self.training:
                return
            ids = self._routing.expert_ids if module.router is None else module.router.last_ids
            self.load[layer] += torch.bincount(ids.reshape(-1).cpu(), minlength=self.num_experts).double()
        return hook

    def forward(self, input_ids: Tensor, routing: Optional[Routing] = None) -> Tensor:
        self._routing = routing
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, routing)
        return self.head(self.norm(x))

    def aux_loss(self) -> Tensor:
        losses = [b.moe.aux_loss for b in self.blocks if b.moe.aux_loss is not None]
        return sum(losses) / len(losses) if losses else torch.zeros(())


def hash_table(num_experts: int, top_k: int, seed: int = 0) -> Tensor:
    """[VOCAB, K] distinct experts per token id: expert (base[v] + j) mod E for j < K, with base a
    shuffled, balanced assignment, so every expert serves the same number of ids (+-1)."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.arange(VOCAB) % num_experts)[torch.randperm(VOCAB, generator=g)]
    return (base[:, None] + torch.arange(top_k)) % num_experts


RouteFn = Callable[[Tensor], Tuple[Tensor, Tensor]]


def fixed_router(kind: str, num_experts: int, top_k: int, grouter=None) -> RouteFn:
    """input_ids [B, S] -> (ids [B*S, K], weights [B*S, K]) for the fixed routings."""
    if kind == "hash":
        table = hash_table(num_experts, top_k)
        weights = torch.full((1, top_k), 1.0 / top_k)

        def route(input_ids: Tensor):
            ids = table.to(input_ids.device)[input_ids.reshape(-1)]
            return ids, weights.to(input_ids.device).expand(ids.shape[0], top_k)

        return route

    def route(input_ids: Tensor):
        ids, w = grouter.route(input_ids)
        return ids.reshape(-1, ids.shape[-1]), w.reshape(-1, w.shape[-1])

    return route


@torch.no_grad()
def leak_free_routes(grouter, input_ids: Tensor) -> Tuple[Tensor, Tensor]:
    """Routes an autoregressive model could compute: position t routed from tokens <= t only."""
    B, S = input_ids.shape
    ids, weights = [], []
    for t in range(S):
        i, w = grouter.route(input_ids[:, : t + 1])
        ids.append(i[:, -1])
        weights.append(w[:, -1])
    return torch.stack(ids, 1).reshape(B * S, -1), torch.stack(weights, 1).reshape(B * S, -1)


@torch.no_grad()
def evaluate(model: MoELM, windows: Tensor, route: Optional[RouteFn] = None, batch: int = 16,
             routes: Optional[List[Tuple[Tensor, Tensor]]] = None) -> float:
    """Mean next-byte cross-entropy (nats) over validation windows."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for i, start in enumerate(range(0, windows.shape[0], batch)):
        x = windows[start:start + batch]
        routing = None
        if routes is not None:
            routing = Routing.prepare(*routes[i], model.num_experts)
        elif route is not None:
            routing = Routing.prepare(*route(x), model.num_experts)
        logits = model(x, routing)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1), reduction="sum")
        total += float(loss)
        count += x[:, 1:].numel()
    model.train(was)
    return total / count


def routing_summary(model: MoELM) -> Dict[str, object]:
    """Global MaxVio of the routing over training (mean over layers) and the per-layer loads."""
    load = model.load
    mean = load.mean(1, keepdim=True).clamp_min(1e-12)
    vio = ((load.max(1, keepdim=True).values - mean) / mean).squeeze(1)
    return {"max_vio": float(vio.mean()), "load": load.tolist()}
