"""The demo's MoE language model and the routings it is trained with.

Every run builds the same model from the same seed: embedding -> N blocks (causal attention,
then a grouter.nn.MoE in place of the MLP) -> RMSNorm -> head. What differs is the routing:

  learned_aux   a softmax top-k router per layer, trained with the load-balancing loss
  learned_bias  a sigmoid top-k router per layer with an aux-loss-free expert bias
  hash          a fixed table token id -> K experts, every expert serving as many ids
  hash_balanced the paper's Balanced Hash: every expert serves as many training tokens (within 1%),
                the ids' K-sets drawn over all C(E, K) sets
  grouter*      a frozen Grouter's routes (pre-dispatched before training), shared by all layers
"""

from __future__ import annotations

import random
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import MoE, Routing, SigmoidTopKRouter, SoftmaxTopKRouter
from ..nn.attention import Attention
from .corpus import VOCAB

AUX_LOSS_COEF = 0.01  # on the mean of the layers' aux losses: AUX_LOSS_COEF / n_layers per layer
Z_LOSS_COEF = 1e-3  # ST-MoE's router z-loss, on the mean over layers as well
EVAL_BATCH = 32  # validation windows per forward


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
                 seed: int, router: Optional[str] = None, vocab: int = VOCAB):
        super().__init__()
        torch.manual_seed(seed)  # the same weights for every routing of a seed
        self.num_experts, self.top_k, self.vocab = num_experts, top_k, vocab
        self.embed = nn.Embedding(vocab, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, n_heads, MoE(d_model, d_expert, num_experts, top_k))
                                    for _ in range(n_layers))
        self.norm = nn.RMSNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
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
        """The routers' load-balancing loss of the last forward, mean over layers."""
        return self._mean_router_term("aux_loss")

    def z_loss(self) -> Tensor:
        """The routers' z-loss of the last forward, mean over layers."""
        return self._mean_router_term("z_loss")

    def _mean_router_term(self, name: str) -> Tensor:
        terms = [getattr(b.moe.router, name) for b in self.blocks
                 if b.moe.router is not None and getattr(b.moe.router, name, None) is not None]
        return sum(terms) / len(terms) if terms else torch.zeros(())


def hash_table(num_experts: int, top_k: int, seed: int = 0, vocab: int = VOCAB) -> Tensor:
    """[vocab, K] distinct experts per token id: expert (base[v] + j) mod E for j < K, with base a
    shuffled, balanced assignment, so every expert serves the same number of ids (+-1)."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.arange(vocab) % num_experts)[torch.randperm(vocab, generator=g)]
    return (base[:, None] + torch.arange(top_k)) % num_experts


def balanced_hash_table(frequencies: Tensor, num_experts: int, top_k: int, seed: int = 0,
                        slack: float = 0.01) -> Tensor:
    """[vocab, K] distinct experts per token id, balanced by token frequency (the paper's Balanced
    Hash) and spread over the C(E, K) expert sets.

    Ids in falling frequency each take K experts drawn at random (seeded) among those whose load
    stays within (1 + slack) of the final mean (fewer than K such: the K least loaded). Every expert
    ends within that cap, and equal tokens per expert does not collapse the ids onto a few sets.
    """
    if top_k > num_experts:
        raise ValueError(f"top_k {top_k} > num_experts {num_experts}")
    rng = random.Random(seed)
    freq = frequencies.double().tolist()
    cap = (1 + slack) * top_k * sum(freq) / num_experts
    load = [0.0] * num_experts
    experts = range(num_experts)
    table = [[0] * top_k for _ in freq]
    for v in torch.argsort(frequencies.double(), descending=True, stable=True).tolist():
        f = freq[v]
        room = [e for e in experts if load[e] + f <= cap]
        if len(room) >= top_k:
            chosen = rng.sample(room, top_k)
        else:
            chosen = sorted(experts, key=lambda e: (load[e], rng.random()))[:top_k]
        table[v] = sorted(chosen)
        for e in chosen:
            load[e] += f
    return torch.tensor(table, dtype=torch.int64).reshape(-1, top_k)


RouteFn = Callable[[Tensor], Tuple[Tensor, Tensor]]


def table_router(table: Tensor) -> RouteFn:
    """input_ids [B, S] -> (ids [B*S, K], equal weights [B*S, K]) from a token id -> experts table."""
    top_k = table.shape[1]
    weights = torch.full((1, top_k), 1.0 / top_k)

    def route(input_ids: Tensor):
        ids = table.to(input_ids.device)[input_ids.reshape(-1)]
        return ids, weights.to(input_ids.device).expand(ids.shape[0], top_k)

    return route


def grouter_router(grouter) -> RouteFn:
    """input_ids [B, S] -> (ids [B*S, K], weights [B*S, K]) from a frozen Grouter."""
    def route(input_ids: Tensor):
        ids, w = grouter.route(input_ids)
        return ids.reshape(-1, ids.shape[-1]), w.reshape(-1, w.shape[-1])

    return route


@torch.no_grad()
def leak_free_routes(grouter, input_ids: Tensor) -> Tuple[Tensor, Tensor]:
    """Routes an autoregressive model could compute: position t routed from tokens <= t only.

    A causal Grouter decodes incrementally with its cache (what generation does); a bidirectional
    one is run once per prefix.
    """
    B, S = input_ids.shape
    if getattr(grouter, "causal", False):
        from ..router import GrouterCache

        cache, parts = GrouterCache(), []
        for t in range(S):
            parts.append(grouter.route(input_ids[:, t:t + 1], cache=cache))
        ids, weights = torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)
        return ids.reshape(B * S, -1), weights.reshape(B * S, -1)
    ids, weights = [], []
    for t in range(S):
        i, w = grouter.route(input_ids[:, : t + 1])
        ids.append(i[:, -1])
        weights.append(w[:, -1])
    return torch.stack(ids, 1).reshape(B * S, -1), torch.stack(weights, 1).reshape(B * S, -1)


@torch.no_grad()
def evaluate(model: MoELM, windows: Tensor, token_bytes: Optional[Tensor] = None,
             routes: Optional[List[Tuple[Tensor, Tensor]]] = None, batch: int = EVAL_BATCH) -> float:
    """Next-token cross-entropy over validation windows in nats per byte: summed over the predicted
    tokens and divided by the bytes they decode to (token_bytes; None: one byte per token). routes:
    a fixed routing's (ids, weights) per batch of `batch` windows (None: the model's own routers)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for i, start in enumerate(range(0, windows.shape[0], batch)):
        x = windows[start:start + batch]
        routing = Routing.prepare(*routes[i], model.num_experts) if routes is not None else None
        logits = model(x, routing)
        target = x[:, 1:]
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, model.vocab), target.reshape(-1), reduction="sum")
        total += float(loss)
        count += int(token_bytes.to(target.device)[target].sum()) if token_bytes is not None else target.numel()
    model.train(was)
    return total / count


def routing_summary(model: MoELM) -> Dict[str, object]:
    """Global MaxVio of the routing over training (mean over layers) and the per-layer loads."""
    load = model.load
    mean = load.mean(1, keepdim=True).clamp_min(1e-12)
    vio = ((load.max(1, keepdim=True).values - mean) / mean).squeeze(1)
    return {"max_vio": float(vio.mean()), "load": load.tolist()}
