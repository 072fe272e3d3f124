"""Attached models: routes from outside, routes that belong to one forward, modes, compile, save/load."""

import copy
import subprocess
import sys
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import grouter  # noqa: E402
import grouter.hf  # noqa: E402
from hf_models import VOCAB, count_plans, grads, small_grouter, tiny  # noqa: E402


def pair(name="qwen3_moe", **kw):
    """The same model twice: one routed by a Grouter, one attached without (routes from outside)."""
    model = tiny(name, **kw)
    other = copy.deepcopy(model)
    g = small_grouter()
    return grouter.hf.attach(model, g), grouter.hf.attach(other, None), g


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


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_save_and_load_keep_the_grouter(tmp_path, name):
    model, _, g = pair(name)
    model.eval()
    ids = torch.randint(3, VOCAB, (2, 10))
    expected = model(ids).logits
    grouter.hf.save_pretrained(model, tmp_path / "a")
    model.save_pretrained(tmp_path / "b")  # the attached model's own save keeps the Grouter too
    for folder in ("a", "b"):
        marker = json.loads((tmp_path / folder / "config.json").read_text())["grouter"]
        assert marker["path"] == "grouter" and marker["checksum"] == g.checksum()
        loaded = grouter.hf.from_pretrained(tmp_path / folder)
        assert loaded.config._experts_implementation == "grouter"
        assert grouter.hf.attachment_of(loaded).grouter.checksum() == g.checksum()
        assert torch.equal(loaded(ids).logits, expected)
    with pytest.raises(RuntimeError, match="saved with a Grouter"):  # loaded without grouter: not silent
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a", experts_implementation="grouter")(ids)
    # plain transformers, as a user or pipeline() loads it: the folder names the grouter implementation
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert plain.config._experts_implementation == "grouter"
    with pytest.raises(RuntimeError, match="grouter.hf.from_pretrained"):
        plain(ids)
    for implementation in ("eager", "grouped_mm"):  # chosen explicitly: it runs, but never silently
        other = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a", experts_implementation=implementation)
        with pytest.warns(UserWarning, match="its never-trained gates route it"):
            other(ids)
    code = f"import transformers; transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / 'a')!r})"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)  # grouter never imported
    assert r.returncode != 0 and 'experts_implementation="grouter"' in r.stderr


def test_load_errors(tmp_path):
    model, outside, g = pair()
    tiny("olmoe").save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="records no Grouter"):
        grouter.hf.from_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="not a folder"):
        grouter.hf.from_pretrained(tmp_path / "missing")
    grouter.hf.save_pretrained(model, tmp_path / "m")
    small_grouter().save(tmp_path / "m" / "grouter")  # another Grouter in its place
    with pytest.raises(ValueError, match="checksum"):
        grouter.hf.from_pretrained(tmp_path / "m")
    grouter.hf.save_pretrained(outside, tmp_path / "routes_only")
    loaded = grouter.hf.from_pretrained(tmp_path / "routes_only")
    assert grouter.hf.attachment_of(loaded).grouter is None


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
