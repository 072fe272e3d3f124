"""grouter.titan.convert on torchtitan's Qwen3-MoE and DeepSeek-V3: what it changes, what it refuses,
and that the converted model trains exactly as the same weights through grouter.nn.MoE."""

import pytest

pytest.importorskip("torchtitan", reason="grouter[titan] is not installed")

import torch  # noqa: E402
from torchtitan.models.common.token_dispatcher import AllToAllTokenDispatcher  # noqa: E402

import grouter  # noqa: E402
import grouter.titan as gt  # noqa: E402
from titan_models import E, K, FAMILIES, build, lm_loss, reference, small_grouter, tokens  # noqa: E402

# fp32 sums in different orders (attention, norms): equal to a few ulps per step.
TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_convert_fixes_the_router_and_keeps_the_experts_parameters(family):
    model = build(family)
    names_before = {n for n, _ in model.named_parameters()}
    experts_before = {n: p for n, p in model.named_parameters() if "inner_experts" in n}
    gt.convert(model, small_grouter())
    names = {n for n, _ in model.named_parameters()}
    assert names == {n for n in names_before if ".router.gate." not in n}  # only the gates went
    assert all(p is dict(model.named_parameters())[n] for n, p in experts_before.items())
    assert not any("expert_bias" in n for n, _ in model.named_buffers())
    for _, moe in gt.moe_layers(model):
        assert isinstance(moe.router, gt.FixedRouter) and moe.load_balance_coeff is None and moe.expert_bias_E is None
        assert isinstance(moe.routed_experts.token_dispatcher, gt.GrouterTokenDispatcher)
        assert isinstance(moe.routed_experts.inner_experts, gt.GrouterExperts)
    # A frozen Grouter outside the module tree: nothing of it reaches an optimizer or a checkpoint.
    g = model.grouter_routes.grouter
    assert not any(p.requires_grad for p in g.parameters()) and not g.training
    assert not any(p is q for p in model.parameters() for q in g.parameters())


def test_convert_refuses_what_would_route_by_something_else():
    with pytest.raises(ValueError, match="E=4 K=2"):
        gt.convert(build(), grouter.Grouter(256, 4, 2, d_model=16, n_layers=1, n_heads=2))
    with pytest.raises(ValueError, match="K=3"):
        gt.convert(build(), grouter.Grouter(256, E, 3, d_model=16, n_layers=1, n_heads=2))
    with pytest.raises(ValueError, match="no torchtitan MoE"):
        gt.convert(torch.nn.Sequential(torch.nn.Linear(2, 2)), small_grouter())
    model = gt.convert(build(), small_grouter())
    with pytest.raises(ValueError, match="already converted"):
        gt.convert(model, small_grouter())

    class DeepEPLike(AllToAllTokenDispatcher):
        pass

    model = build()
    for _, moe in gt.moe_layers(model):
        moe.routed_experts.token_dispatcher = DeepEPLike(AllToAllTokenDispatcher.Config(num_experts=E, top_k=K))
    with pytest.raises(ValueError, match="DeepEPLike"):
        gt.convert(model, small_grouter())


def test_routes_come_from_the_batch_then_set_routes_then_the_grouter_and_never_from_a_previous_step():
    g = small_grouter()
    model = gt.convert(build(), None)
    x = tokens()
    with pytest.raises(RuntimeError, match="no routes"):
        model(x)
    ids, w = g.route(x)
    gt.set_routes(model, ids, w)
    out = model(x)
    assert torch.equal(model.grouter_routes.routing.expert_ids, ids.reshape(-1, K))
    with pytest.raises(RuntimeError, match="no routes"):  # consumed: the next step needs its own
        model(x)
    # The trainer passes input_dict's other keys as keyword arguments; the hook takes them out.
    out2 = model(x, grouter_expert_ids=ids, grouter_weights=w)
    assert torch.equal(out, out2)
    with pytest.raises(ValueError, match="do not cover"):
        model(x, grouter_expert_ids=ids[:, :-1], grouter_weights=w[:, :-1])
    with pytest.raises(ValueError, match="finite and non-negative"):
        model(x, grouter_expert_ids=ids, grouter_weights=-w)
    with pytest.raises(ValueError, match="only one of"):
        model(x, grouter_expert_ids=ids)
    bad = ids.clone()
    bad[0, 0, 0] = E
    with pytest.raises((ValueError, IndexError, RuntimeError), match="expert"):
        model(x, grouter_expert_ids=bad, grouter_weights=w)
    attached = gt.convert(build(), g)
    assert torch.equal(attached(x), out)  # the attached Grouter routes the same tokens the same way
    with pytest.raises(ValueError, match="pipeline stage"):  # hidden states in: nothing to route by
        attached(torch.randn(2, 16, 64))


def test_one_routing_plan_per_step_for_every_layer(monkeypatch):
    model = gt.convert(build(n_layers=3), small_grouter())
    calls = []
    real = grouter.ops.routing_plan
    monkeypatch.setattr(grouter.ops, "routing_plan", lambda *a: calls.append(1) or real(*a))
    model(tokens()).sum().backward()
    assert len(calls) == 1 and model.grouter_routes.plans_built == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_three_training_steps_equal_grouter_nn_moe_on_the_same_routes(family):
    g = small_grouter()
    model = build(family)
    ref, ref_routes = reference(model)
    gt.convert(model, g)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    for step in range(3):
        x = tokens(seed=10 + step, length=17)
        inputs, labels = x[:, :-1], x[:, 1:]
        ref_routes["step"] = g.route(inputs)
        loss = lm_loss(model(inputs), labels)
        ref_loss = lm_loss(ref(inputs), labels)
        torch.testing.assert_close(loss, ref_loss, **TOL)
        for o, l in ((opt, loss), (ref_opt, ref_loss)):
            o.zero_grad()
            l.backward()
            o.step()
    for (name, moe), (_, ref_moe) in zip(gt.moe_layers(model), [(n, m) for n, m in ref.named_modules()
                                                                 if type(m).__name__ == "GrouterMoE"]):
        inner, experts = moe.routed_experts.inner_experts, ref_moe.moe.experts
        torch.testing.assert_close(torch.cat([inner.w1_EFD, inner.w3_EFD], 1), experts.gate_up_proj, **TOL)
        torch.testing.assert_close(inner.w2_EDF, experts.down_proj, **TOL)


def test_dispatch_only_conversion_matches_torchtitans_bf16_experts():
    # experts=False keeps torchtitan's GroupedExperts (bf16 compute); the routes and combine are ours.
    g = small_grouter()
    x = tokens()
    ours = gt.convert(build(), g)
    theirs = gt.convert(build(), g, experts=False)
    assert type(gt.moe_layers(theirs)[0][1].routed_experts.inner_experts).__name__ == "GroupedExperts"
    torch.testing.assert_close(theirs(x), ours(x), rtol=2e-2, atol=2e-2)


def test_training_is_bitwise_reproducible():
    def run():
        model = gt.convert(build(), small_grouter())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses = []
        for step in range(2):
            x = tokens(seed=step)
            loss = lm_loss(model(x[:, :-1]), x[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        return losses, [p.detach().clone() for p in model.parameters()]

    (l1, p1), (l2, p2) = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(l1 + p1, l2 + p2))


def test_bf16_model_trains_close_to_fp32():
    g = small_grouter()
    x = tokens(length=17)
    fp32 = gt.convert(build(), g)
    bf16 = gt.convert(build().to(torch.bfloat16), g)
    loss32 = lm_loss(fp32(x[:, :-1]), x[:, 1:])
    loss16 = lm_loss(bf16(x[:, :-1]), x[:, 1:])
    loss16.backward()
    torch.testing.assert_close(loss16, loss32, rtol=2e-2, atol=2e-2)
    inner = gt.moe_layers(bf16)[0][1].routed_experts.inner_experts
    assert inner.w1_EFD.grad.dtype == torch.bfloat16 and torch.isfinite(inner.w1_EFD.grad.float()).all()


def test_convert_on_the_meta_device_then_materialise():
    # torchtitan's trainer builds on meta, converts, parallelizes, then to_empty + init_weights.
    model = build(meta=True)
    gt.convert(model, small_grouter())
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights(buffer_device=torch.device("cpu"))
    assert not any("expert_bias" in n for n, _ in model.named_buffers())  # init does not bring it back
    # The same as converting a materialised model and initialising it the same way (no gates left
    # to draw random numbers for, in either).
    reference_model = gt.convert(build(), small_grouter())
    torch.manual_seed(0)
    reference_model.init_weights(buffer_device=torch.device("cpu"))
    torch.testing.assert_close(model(tokens()), reference_model(tokens()), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_a_converted_moe_layer_compiles_fullgraph(backend):
    model = gt.convert(build(), small_grouter())
    x = tokens()
    model.grouter_routes.prepare(*model.grouter_routes.grouter.route(x), x)
    moe = gt.moe_layers(model)[0][1]
    h = torch.randn(2, 16, 64, requires_grad=True)
    eager = moe(h)
    (grad_eager,) = torch.autograd.grad(eager.square().sum(), h)
    compiled = torch.compile(moe, backend=backend, fullgraph=True)(h)
    (grad,) = torch.autograd.grad(compiled.square().sum(), h)
    torch.testing.assert_close(compiled, eager, **TOL)
    torch.testing.assert_close(grad, grad_eager, **TOL)
