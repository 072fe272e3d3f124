"""transformers integration: the "grouter" experts implementation and attached fixed routing."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import grouter.hf  # noqa: E402  (registers "grouter")
from grouter import nn as gnn  # noqa: E402

VOCAB = 101
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=64, pad_token_id=0,
              bos_token_id=1, eos_token_id=2)
MODELS = {
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=8)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=8)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=8, moe_intermediate_size=24, shared_expert_intermediate_size=40)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(num_experts=8, moe_intermediate_size=24)),
}


def tiny(name, implementation="eager"):
    config_cls, model_cls, extra = MODELS[name]
    config = getattr(transformers, config_cls)(**COMMON, **extra)
    model = getattr(transformers, model_cls)(config).float()
    with torch.no_grad():  # some models zero-init their gates; make routing non-trivial
        for _, block, attr in grouter.hf.moe_blocks(model):
            getattr(block, attr).weight.normal_(std=0.5)
    model.set_experts_implementation(implementation)
    return model


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


@pytest.mark.parametrize("name", list(MODELS))
def test_grouter_experts_match_eager(name):
    torch.manual_seed(0)
    eager = tiny(name)
    ours = copy.deepcopy(eager)
    ours.set_experts_implementation("grouter")
    assert ours.config._experts_implementation == "grouter"
    ids = torch.randint(3, VOCAB, (3, 19))
    a, b = eager(ids).logits, ours(ids).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    a.square().sum().backward()
    b.square().sum().backward()
    ga, gb = grads(eager), grads(ours)
    assert ga.keys() == gb.keys() and any("experts" in n for n in ga)
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-4, atol=1e-5, msg=n)


def test_register_is_idempotent():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    grouter.hf.register()
    grouter.hf.register()
    assert ALL_EXPERTS_FUNCTIONS["grouter"] is grouter.hf.experts_forward


def test_from_pretrained_with_grouter_experts(tmp_path):
    model = tiny("olmoe")
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="grouter")
    assert loaded.config._experts_implementation == "grouter"
    ids = torch.randint(3, VOCAB, (2, 11))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_attach_routes_every_layer_and_ignores_the_gates(name):
    model = tiny(name, "grouter")
    router = TableRouter(VOCAB, 8, 2)
    grouter.hf.attach(model, router)
    seen = []
    hooks = [block.experts.register_forward_pre_hook(lambda m, args: seen.append(args[1]))
             for _, block, _ in grouter.hf.moe_blocks(model)]
    ids = torch.randint(3, VOCAB, (2, 13))
    before = gnn.plan_builds()
    out = model(ids).logits
    assert gnn.plan_builds() - before == 1  # one plan for all layers
    assert router.calls == 1  # routed once per forward
    expected = router.ids[ids].reshape(-1, 2)
    assert len(seen) == model.config.num_hidden_layers
    assert all(torch.equal(s, expected) for s in seen)
    with torch.no_grad():  # the learned gates no longer matter
        for _, block, attr in grouter.hf.moe_blocks(model):
            getattr(block, attr).weight.normal_()
    torch.testing.assert_close(model(ids).logits, out)
    out.sum().backward()
    assert all(getattr(b, a).weight.grad is None for _, b, a in grouter.hf.moe_blocks(model))
    for h in hooks:
        h.remove()
    grouter.hf.detach(model)
    assert not torch.allclose(model(ids).logits, out)  # the (perturbed) learned gates route again


def test_attach_matches_moe_layer_routing_by_hand():
    model = tiny("qwen3_moe", "grouter")
    router = TableRouter(VOCAB, 8, 2, seed=3)
    ids = torch.randint(3, VOCAB, (2, 9))
    grouter.hf.attach(model, router)
    attached = model(ids).logits
    grouter.hf.detach(model)
    for _, block, attr in grouter.hf.moe_blocks(model):  # the same routes, given by hand to each gate
        gate = getattr(block, attr)
        gate.forward = lambda h, _ids=ids: (h.new_zeros(h.shape[0], 8), router.weights[_ids].reshape(-1, 2),
                                            router.ids[_ids].reshape(-1, 2))
    torch.testing.assert_close(model(ids).logits, attached)


def test_attach_errors():
    with pytest.raises(ValueError, match="no MoE blocks"):
        grouter.hf.attach(torch.nn.Linear(3, 3), TableRouter(VOCAB, 8, 2))
    model = tiny("olmoe")
    with pytest.raises(ValueError, match="vocabulary"):
        grouter.hf.attach(model, TableRouter(VOCAB + 5, 8, 2))
    with pytest.raises(ValueError, match="experts"):
        grouter.hf.attach(model, TableRouter(VOCAB, 4, 2))
    grouter.hf.attach(model, TableRouter(VOCAB, 8, 2))
    with pytest.raises(RuntimeError, match="input_ids"):
        model(inputs_embeds=torch.randn(1, 4, 32))
    grouter.hf.detach(model)
    grouter.hf.detach(model)  # idempotent
    model(inputs_embeds=torch.randn(1, 4, 32))
