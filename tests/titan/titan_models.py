"""Tiny torchtitan models, a Grouter for them, and the reference they are held to: the same
weights with every MoE layer computed by grouter.nn.MoE on the same routes."""

from __future__ import annotations

import copy

import torch
from torch import nn

import grouter
import grouter.titan
from grouter.titan import as_grouter_moe, moe_layers
from grouter.titan.tiny import deepseek_v3_config, qwen3_moe_config

VOCAB, E, K = 256, 8, 2
FAMILIES = {"qwen3": qwen3_moe_config, "deepseek_v3": deepseek_v3_config}


def build(family: str = "qwen3", seed: int = 0, device="cpu", meta: bool = False, **kw) -> nn.Module:
    """A torchtitan model built as its trainer builds it: on the meta device, then materialised."""
    cfg = FAMILIES[family](vocab_size=VOCAB, num_experts=E, top_k=K, **kw)
    with torch.device("meta"):
        model = cfg.build()
    if meta:
        return model
    model.to_empty(device=device)
    torch.manual_seed(seed)
    model.init_weights(buffer_device=torch.device(device))
    return model


def small_grouter(seed: int = 1) -> grouter.Grouter:
    torch.manual_seed(seed)
    return grouter.Grouter(VOCAB, E, K, d_model=32, n_layers=1, n_heads=2)


def tokens(batch: int = 2, length: int = 16, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


class GrouterMoE(nn.Module):
    """A torchtitan MoE's experts (and shared experts) as grouter.nn.MoE on routes set per step."""

    def __init__(self, moe: nn.Module, routes: dict):
        super().__init__()
        self.moe = as_grouter_moe(moe)
        self.shared_experts = copy.deepcopy(moe.shared_experts)
        self.routes = routes

    def forward(self, x):
        out = self.moe(x, routing=self.routes["step"])
        return out if self.shared_experts is None else out + self.shared_experts(x)


def reference(model: nn.Module) -> "tuple[nn.Module, dict]":
    """A copy of an unconverted model with each MoE layer replaced by GrouterMoE; routes["step"] = (ids, w)."""
    ref, routes = copy.deepcopy(model), {}
    for name, moe in moe_layers(ref):
        parent, attr = ref.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
        setattr(parent, attr, GrouterMoE(moe, routes))
    return ref, routes


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


def one_process_training(model: nn.Module, routes_path, world: int, global_batch: int, steps: int) -> list:
    """What `world` data-parallel ranks train on pre-dispatched routes, in one process: each step's
    global batch is the ranks' batches (sample j of rank r = folder sample j * world + r) in rank
    order, the loss their mean. SGD: Adam would turn the last-ulp differences of near-zero gradients
    (summed in another order by the ranks) into steps of +-lr, and any comparison into noise."""
    reader = grouter.PredispatchReader(routes_path)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    per_rank = global_batch // world
    losses = []
    for step in range(steps):
        rows = [reader[(step * per_rank + b) * world + r] for r in range(world) for b in range(per_rank)]
        x, ids, w = (torch.stack(t) for t in zip(*rows))
        grouter.titan.set_routes(model, ids[:, :-1], w[:, :-1])
        loss = lm_loss(model(x[:, :-1]), x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return losses
