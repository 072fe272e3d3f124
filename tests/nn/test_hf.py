"""transformers integration: the "grouter" experts implementation and attached fixed routing."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import grouter.hf  # noqa: E402  (registers "grouter")

from hf_models import MODELS, VOCAB, TableRouter, count_plans, grads, tiny  # noqa: E402


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
def test_attach_routes_every_layer_and_ignores_the_gates(name, monkeypatch):
    model = tiny(name)
    router = TableRouter(VOCAB, 8, 2)
    grouter.hf.attach(model, router)
    seen = []
    hooks = [block.experts.register_forward_pre_hook(lambda m, args: seen.append(args[1]))
             for _, block, _ in grouter.nn.moe_blocks(model)]
    ids = torch.randint(3, VOCAB, (2, 13))
    plans = count_plans(monkeypatch)
    out = model(ids).logits
    assert len(plans) == 1  # one plan for all layers
    assert router.calls == 1  # routed once per forward
    expected = router.ids[ids].reshape(-1, 2)
    assert len(seen) == model.config.num_hidden_layers
    assert all(torch.equal(s, expected) for s in seen)
    with torch.no_grad():  # the learned gates no longer matter
        for _, block, attr in grouter.nn.moe_blocks(model):
            getattr(block, attr).weight.normal_()
    torch.testing.assert_close(model(ids).logits, out)
    out.sum().backward()
    assert all(getattr(b, a).weight.grad is None for _, b, a in grouter.nn.moe_blocks(model))
    for h in hooks:
        h.remove()
    assert model.config._experts_implementation == "grouter"  # attach switched it
    grouter.hf.detach(model)
    assert model.config._experts_implementation == "eager"  # detach restored it
    assert not torch.allclose(model(ids).logits, out)  # the (perturbed) learned gates route again


def test_attach_matches_moe_layer_routing_by_hand():
    model = tiny("qwen3_moe", "grouter")
    router = TableRouter(VOCAB, 8, 2, seed=3)
    ids = torch.randint(3, VOCAB, (2, 9))
    grouter.hf.attach(model, router)
    attached = model(ids).logits
    grouter.hf.detach(model)
    for _, block, attr in grouter.nn.moe_blocks(model):  # the same routes, given by hand to each gate
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


def test_attach_refuses_gates_it_cannot_stand_in_for():
    class Experts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(torch.zeros(4, 8, 4))
            self.num_experts = 4

    class Block(torch.nn.Module):  # unpacks its router as (scores, logits), like Llama 4
        def __init__(self):
            super().__init__()
            self.experts, self.router = Experts(), torch.nn.Linear(4, 4)

        def forward(self, h):
            router_scores, router_logits = self.router(h)
            return h

    with pytest.raises(ValueError, match=r"unpacks its router as \(router_scores, router_logits\)"):
        grouter.hf.attach(torch.nn.Sequential(Block()), TableRouter(VOCAB, 4, 2))
