"""Tiny transformers MoE models and a stand-in router, shared by the transformers tests."""

import copy
import warnings

import torch
import transformers

import grouter
import grouter.hf

VOCAB = 101
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=128, pad_token_id=0,
              bos_token_id=1, eos_token_id=2)
MODELS = {
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=8)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=8)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=8, moe_intermediate_size=24, shared_expert_intermediate_size=40)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(num_experts=8, moe_intermediate_size=24)),
}


def tiny(name, implementation="eager", **overrides):
    config_cls, model_cls, extra = MODELS[name]
    config = getattr(transformers, config_cls)(**{**COMMON, **extra, **overrides})
    model = getattr(transformers, model_cls)(config).float()
    with torch.no_grad():  # some models zero-init their gates; make routing non-trivial
        for _, block, attr in grouter.nn.moe_blocks(model):
            getattr(block, attr).weight.normal_(std=0.5)
    model.set_experts_implementation(implementation)
    return model


def small_grouter(E=8, K=2, causal=True):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = grouter.Grouter(VOCAB, E, K, d_model=32, n_layers=2, n_heads=2, causal=causal)
    with torch.no_grad():  # sharper logits than the tiny init, so routes differ from token to token
        g.proj.weight.mul_(20)
    return g


class TableRouter:
    """A stand-in for a Grouter: a fixed route per token id (what a distilled Grouter computes)."""

    def __init__(self, vocab_size, num_experts, top_k, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.vocab_size, self.num_experts, self.top_k = vocab_size, num_experts, top_k
        self.ids = torch.rand(vocab_size, num_experts, generator=g).topk(top_k, dim=1).indices
        self.weights = torch.rand(vocab_size, top_k, generator=g).softmax(-1)
        self.calls = 0

    def route(self, input_ids):
        self.calls += 1
        return self.ids[input_ids], self.weights[input_ids]


def grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def count_plans(monkeypatch):
    """Routing plans built through grouter.ops.routing_plan (the library keeps no counter)."""
    calls = []
    real = grouter.ops.routing_plan
    monkeypatch.setattr(grouter.ops, "routing_plan", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def pair(name="qwen3_moe", **kw):
    """The same model twice: one routed by a Grouter, one attached without (routes from outside)."""
    model = tiny(name, **kw)
    other = copy.deepcopy(model)
    g = small_grouter()
    return grouter.hf.attach(model, g), grouter.hf.attach(other, None), g
