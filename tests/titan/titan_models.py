"""Tiny torchtitan models, a Grouter for them, and the reference they are held to: the same
weights with every MoE layer computed by grouter.nn.MoE on the same routes."""

from __future__ import annotations

import copy

import torch
from torch import nn

import grouter
from grouter.titan import moe_layers
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
        inner = moe.routed_experts.inner_experts
        E_, F, D = inner.w1_EFD.shape
        self.moe = grouter.nn.MoE(D, F, E_, K, router=None)
        with torch.no_grad():
            self.moe.experts.gate_up_proj.copy_(torch.cat([inner.w1_EFD, inner.w3_EFD], dim=1))
            self.moe.experts.down_proj.copy_(inner.w2_EDF)
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
