"""Attached models: the Grouter or routes from outside route every block; routes belong to one forward; modes, compile, checkpointing."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import grouter  # noqa: E402
import grouter.hf  # noqa: E402  (registers "grouter")
from hf_models import MODELS, VOCAB, TableRouter, count_plans, grads, pair, tiny  # noqa: E402


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


def test_set_routes_equals_the_attached_grouter():
    model, outside, g = pair()
    ids = torch.randint(3, VOCAB, (2, 12))
    a = model(input_ids=ids, labels=ids)
    grouter.hf.set_routes(outside, *g.route(ids))
    b = outside(input_ids=ids, labels=ids)
    assert torch.equal(a.logits, b.logits)
    a.loss.backward()
    b.loss.backward()
    ga, gb = grads(model), grads(outside)
    assert ga.keys() == gb.keys()
    assert all(torch.equal(ga[n], gb[n]) for n in ga)
    with pytest.raises(RuntimeError, match="set_routes"):  # consumed by that forward
        outside(input_ids=ids)


def test_a_table_router_attaches_like_a_grouter(tmp_path):
    # grouter export-table's table: each token routed by its id alone, as a hash-routing engine would
    model, outside, g = pair()
    table = grouter.TableRouter.from_routes(g, [torch.randint(0, VOCAB, (4, 16)) for _ in range(3)])
    tabled = grouter.hf.attach(copy.deepcopy(grouter.hf.detach(model)), table)
    ids = torch.randint(3, VOCAB, (2, 12))
    grouter.hf.set_routes(outside, *table.route(ids))
    assert torch.equal(tabled(input_ids=ids).logits, outside(input_ids=ids).logits)
    with pytest.raises(TypeError, match="not saved with a model"):
        tabled.save_pretrained(tmp_path / "m")


def test_set_routes_checks_its_input():
    _, outside, g = pair()
    ids = torch.randint(3, VOCAB, (2, 12))
    r, w = g.route(ids)
    grouter.hf.set_routes(outside, r[:, :5], w[:, :5])
    with pytest.raises(ValueError, match="cover 10 tokens, this forward has 24"):
        outside(input_ids=ids)
    with pytest.raises(ValueError, match="same shape"):
        grouter.hf.set_routes(outside, r, w[..., :1])
    with pytest.raises(ValueError, match="integer"):
        grouter.hf.set_routes(outside, w, w)
    with pytest.raises(RuntimeError, match="not attached"):
        grouter.hf.set_routes(tiny("olmoe"), r, w)
    for bad in (-0.5, float("nan"), float("inf")):  # weights are mass: finite and non-negative
        w_bad = w.clone()
        w_bad[1, 3, 0] = bad
        with pytest.raises(ValueError, match="finite and non-negative"):
            grouter.hf.set_routes(outside, r, w_bad)
    grouter.hf.set_routes(outside, r.reshape(-1, 2), w.reshape(-1, 2))  # [T, K] works too
    outside(inputs_embeds=torch.randn(2, 12, 32))  # and without input_ids


def test_training_from_predispatched_routes(tmp_path):
    model, outside, g = pair()
    tokens = torch.randint(3, VOCAB, (6, 16))
    grouter.predispatch(g, tokens, tmp_path / "routes", progress=False)
    reader = grouter.PredispatchReader(tmp_path / "routes", grouter=g)
    for i in range(0, 6, 3):
        batch = [reader[j] for j in range(i, i + 3)]
        x, ids, w = (torch.stack(t) for t in zip(*batch))
        grouter.hf.set_routes(outside, ids, w)
        b = outside(input_ids=x, labels=x)
        a = model(input_ids=x, labels=x)
        assert torch.equal(ids, g.route(x)[0])  # the same experts; weights stored as bf16
        torch.testing.assert_close(b.loss, a.loss, rtol=1e-2, atol=1e-2)
        a.loss.backward()
        b.loss.backward()
        for n, grad in grads(model).items():
            torch.testing.assert_close(grads(outside)[n], grad, rtol=5e-2, atol=5e-3, msg=n)
        model.zero_grad()
        outside.zero_grad()


def test_routes_belong_to_one_forward(monkeypatch):
    model, _, g = pair()
    x1, x2 = torch.randint(3, VOCAB, (2, 9)), torch.randint(3, VOCAB, (2, 9))
    model(input_ids=x1)
    # The base model called directly routes its own input, not the previous call's.
    seen = []
    block = grouter.nn.moe_blocks(model)[0][1]
    hook = block.experts.register_forward_pre_hook(lambda m, args: seen.append(args[1]))
    plans = count_plans(monkeypatch)
    model.model(input_ids=x2)
    hook.remove()
    assert torch.equal(seen[0], g.route(x2)[0].reshape(-1, 2)) and len(plans) == 1
    with pytest.raises(RuntimeError, match="outside a forward"):
        block(torch.randn(2, 9, 32))
    with pytest.raises(RuntimeError, match="outside a forward"):
        model.model.layers[1](torch.randn(2, 9, 32), position_embeddings=model.model.rotary_emb(
            torch.randn(2, 9, 32), torch.arange(9)[None]), attention_mask=None)


def test_inference_mode_forward_and_generate():
    model, _, _ = pair()
    model.eval()
    ids = torch.randint(3, VOCAB, (2, 10))
    expected = model(ids).logits
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, expected)
        model.generate(ids, do_sample=False, max_new_tokens=4)


def test_attached_model_compiles_fullgraph_and_matches_eager():
    torch._dynamo.reset()
    model, _, _ = pair(use_cache=False)
    ref = copy.deepcopy(model)
    ids = torch.randint(3, VOCAB, (2, 16))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for _ in range(2):  # the second step runs the compiled graph again
        out = compiled(input_ids=ids, labels=ids)
        out.loss.backward()
        want = ref(input_ids=ids, labels=ids)
        want.loss.backward()
        torch.testing.assert_close(out.loss, want.loss)
        ga, gb = grads(model), grads(ref)
        assert ga.keys() == gb.keys()
        for n in ga:
            torch.testing.assert_close(ga[n], gb[n], msg=n)


def test_gradient_checkpointing_recomputes_with_the_same_routes():
    model, _, _ = pair(use_cache=False)
    ref = copy.deepcopy(model)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(3, VOCAB, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    ref(input_ids=ids, labels=ids).loss.backward()
    ga, gb = grads(model), grads(ref)
    for n in gb:
        torch.testing.assert_close(ga[n], gb[n], msg=n)


def test_deep_copy_routes_by_its_own_attachment():
    model, _, _ = pair()
    twin = copy.deepcopy(model)
    ids = torch.randint(3, VOCAB, (2, 7))
    torch.testing.assert_close(twin(ids).logits, model(ids).logits)
    assert grouter.hf.attachment_of(twin) is not grouter.hf.attachment_of(model)
    assert grouter.hf.attachment_of(model).last.ids.shape[0] == 14


def test_router_logits_are_the_grouters():
    model, outside, g = pair()
    ids = torch.randint(3, VOCAB, (2, 8))
    out = model(input_ids=ids, output_router_logits=True)
    logits = g(ids).reshape(-1, 8)
    assert all(torch.allclose(r, logits, atol=1e-6) for r in out.router_logits)
    grouter.hf.set_routes(outside, *g.route(ids))
    out = outside(input_ids=ids, output_router_logits=True)
    probs = out.router_logits[0].softmax(-1)  # routes from outside: softmax gives the gate weights
    r, w = g.route(ids)
    torch.testing.assert_close(probs.gather(1, r.reshape(-1, 2)), w.reshape(-1, 2), rtol=1e-5, atol=1e-5)


def test_checkpointed_backwards_take_their_own_forwards_routes():
    # Two forwards, then their backwards in reverse order: each recompute must use its own routes.
    model, _, _ = pair(use_cache=False)
    ref = copy.deepcopy(model)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    x1, x2 = torch.randint(3, VOCAB, (2, 12)), torch.randint(3, VOCAB, (2, 12))
    l1, l2 = model(input_ids=x1, labels=x1).loss, model(input_ids=x2, labels=x2).loss
    (2 * l2).backward()
    l1.backward()
    (2 * ref(input_ids=x2, labels=x2).loss).backward()
    ref(input_ids=x1, labels=x1).loss.backward()
    ga, gb = grads(model), grads(ref)
    for n in gb:
        torch.testing.assert_close(ga[n], gb[n], msg=n)
