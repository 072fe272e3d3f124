import numpy as np
import pytest
import torch

import grouter
import reference as ref
from grouter import nn as gnn


def fixed_routing(T, K, E, device="cpu"):
    ids = ref.random_routing(T, K, E, device=device)
    w = torch.rand(T, K, device=device)
    return ids, w / w.sum(1, keepdim=True)


@pytest.mark.parametrize("T,K,E", [(0, 2, 4), (1, 1, 1), (37, 2, 8), (200, 4, 16), (64, 8, 8)])
def test_fixed_routing_matches_reference(T, K, E, device):
    moe = gnn.MoE(24, 12, E, K).double().to(device)
    x = torch.randn(T, 24, dtype=torch.float64, device=device, requires_grad=True)
    ids, w = fixed_routing(T, K, E, device)
    w = w.double().requires_grad_(True)
    out = moe(x, routing=(ids, w))
    expected = ref.moe_experts(x, ids, w, moe.experts.gate_up_proj, moe.experts.down_proj)
    torch.testing.assert_close(out, expected)
    if T == 0:
        return
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, w, moe.experts.gate_up_proj, moe.experts.down_proj), g)
    want = torch.autograd.grad(expected, (x, w, moe.experts.gate_up_proj, moe.experts.down_proj), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_gradcheck():
    moe = gnn.MoE(6, 4, 4, 2).double()
    x = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    ids, w = fixed_routing(9, 2, 4)
    w = w.double().requires_grad_(True)
    params = (moe.experts.gate_up_proj, moe.experts.down_proj)
    assert torch.autograd.gradcheck(lambda x, w, *_: moe(x, routing=(ids, w)), (x, w, *params))


def test_leading_dims_and_prepared_routing():
    moe = gnn.MoE(16, 8, 4, 2)
    x = torch.randn(3, 5, 16)
    ids, w = fixed_routing(15, 2, 4)
    a = moe(x, routing=(ids.view(3, 5, 2), w.view(3, 5, 2)))
    b = moe(x, routing=gnn.Routing.prepare(ids, w, 4))
    assert a.shape == x.shape
    torch.testing.assert_close(a, b)


def test_router_none_needs_routing():
    moe = gnn.MoE(8, 4, 4, 2)
    with pytest.raises(ValueError, match="routing"):
        moe(torch.randn(3, 8))


def test_bad_routing_is_rejected():
    moe = gnn.MoE(8, 4, 4, 2)
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="tokens"):
        moe(x, routing=fixed_routing(4, 2, 4))
    with pytest.raises(ValueError, match="experts"):
        moe(x, routing=gnn.Routing.prepare(*fixed_routing(3, 2, 8), 8))
    with pytest.raises(IndexError):
        moe(x, routing=(torch.tensor([[0, 1], [2, 9], [1, 3]]), torch.rand(3, 2)))
    with pytest.raises(ValueError, match="hidden size"):
        moe(torch.randn(3, 9), routing=fixed_routing(3, 2, 4))


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu"])
def test_activations(activation):
    moe = gnn.MoE(8, 6, 4, 2, activation=activation).double()
    x = torch.randn(20, 8, dtype=torch.float64)
    ids, w = fixed_routing(20, 2, 4)
    expected = ref.moe_experts(x, ids, w.double(), moe.experts.gate_up_proj, moe.experts.down_proj,
                               act=lambda h: ref.glu(h, activation))
    torch.testing.assert_close(moe(x, routing=(ids, w.double())), expected)


def test_softmax_router_and_losses():
    moe = gnn.MoE(16, 8, 8, 2, router="softmax")
    x = torch.randn(50, 16, requires_grad=True)
    out = moe(x)
    ids, w = moe.router(x)
    torch.testing.assert_close(w.sum(1), torch.ones(50))
    assert moe.aux_loss.ndim == 0 and moe.aux_loss > 0 and moe.z_loss > 0
    (out.sum() + 0.01 * moe.aux_loss + 1e-3 * moe.z_loss).backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0


def test_load_balancing_loss_is_one_when_balanced():
    E = 4
    ids = torch.arange(8).remainder(E).view(8, 1)
    probs = torch.full((8, E), 1 / E)
    torch.testing.assert_close(gnn.load_balancing_loss(probs, ids, E), torch.tensor(1.0))
    assert gnn.max_vio(ids, E) == 0.0
    assert gnn.max_vio(torch.zeros(8, 1, dtype=torch.long), E) == 3.0


def test_losses_of_a_rank_without_tokens_are_zero_not_nan():
    moe = gnn.MoE(16, 8, 4, 2, router="softmax")
    out = moe(torch.zeros(0, 16, requires_grad=True))
    assert out.shape == (0, 16) and moe.aux_loss.item() == 0 and moe.z_loss.item() == 0
    (out.sum() + moe.aux_loss + moe.z_loss).backward()
    assert torch.equal(moe.router.weight.grad, torch.zeros_like(moe.router.weight))


def test_sigmoid_router_bias_balances_load():
    torch.manual_seed(0)
    router = gnn.SigmoidTopKRouter(16, 8, 2, bias_update_rate=0.002)
    with torch.no_grad():
        router.weight[0] += 0.3  # expert 0 is overloaded at first
    x = torch.randn(512, 16)
    before = gnn.max_vio(router(x)[0], 8)
    for _ in range(300):
        router(x)
        router.update_bias()
    after = gnn.max_vio(router(x)[0], 8)
    assert after < before / 3, (before, after)
    assert router.weight.grad is None  # the bias moved without any gradient
    ids, w = router.eval()(x)
    torch.testing.assert_close(w.sum(1), torch.ones(512))


def test_sigmoid_router_under_activation_checkpointing_routes_as_its_forward():
    # The bias moves only in update_bias, never in forward: a checkpoint's recompute picks the
    # experts its forward picked, and the load is counted once.
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    moe = gnn.MoE(16, 8, 8, 2, router="sigmoid")
    moe.router.bias_update_rate = 0.5
    with torch.no_grad():
        moe.router.expert_bias.normal_(std=0.01)  # near ties: any move of the bias changes the picks
    x = torch.randn(64, 16, requires_grad=True)

    def step(checkpointed):
        x.grad = None
        moe.zero_grad()
        moe.router.expert_load.zero_()
        out = checkpoint(moe, x, use_reentrant=False) if checkpointed else moe(x)
        out.square().sum().backward()
        return [x.grad.clone()] + [p.grad.clone() for p in moe.parameters()], moe.router.expert_load.clone()

    (plain, load), (ckpt, ckpt_load) = step(False), step(True)
    assert all(torch.equal(a, b) for a, b in zip(plain, ckpt))
    assert torch.equal(load, ckpt_load) and load.sum() == 64 * 2
    bias = moe.router.expert_bias.clone()
    assert gnn.update_router_biases(moe) == 1
    assert not torch.equal(moe.router.expert_bias, bias) and moe.router.expert_load.sum() == 0
    moe.eval()(x)
    assert moe.router.expert_load.sum() == 0  # eval forwards are not counted


def test_softmax_router_aux_loss_counts_the_local_batch_by_default():
    router = gnn.SoftmaxTopKRouter(16, 8, 2)
    x = torch.randn(40, 16)
    ids, _ = router(x)
    probs = router.logits.softmax(-1)
    f = torch.bincount(ids.reshape(-1), minlength=8).float() / ids.numel()
    torch.testing.assert_close(router.aux_loss, 8 * (f * probs.mean(0)).sum())
    router.aux_loss_group = "world"  # no process group: the local batch is the global one
    router(x)
    torch.testing.assert_close(router.aux_loss, 8 * (f * probs.mean(0)).sum())


def count_plans(monkeypatch):
    """Counts routing plans built through grouter.ops.routing_plan (no global counter in the library)."""
    calls = []
    real = grouter.ops.routing_plan
    monkeypatch.setattr(grouter.ops, "routing_plan", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_plan_built_once_for_n_layers(monkeypatch):
    layers = torch.nn.ModuleList(gnn.MoE(16, 8, 8, 2) for _ in range(6))
    x = torch.randn(40, 16)
    routing = gnn.Routing.prepare(*fixed_routing(40, 2, 8), 8)
    plans = count_plans(monkeypatch)
    for layer in layers:
        x = x + layer(x, routing=routing)
    assert len(plans) == 0  # prepared once, outside the layers
    ids, w = fixed_routing(40, 2, 8)
    for layer in layers:
        x = x + layer(x, routing=(ids, w))  # a bare pair is planned by each layer: nothing is cached
    assert len(plans) == 6


def test_ids_changed_in_place_are_replanned():
    # A refilled buffer (torch.from_numpy of a reused array) changes without a version bump.
    moe = gnn.MoE(16, 8, 8, 2)
    x = torch.randn(30, 16)
    buf = np.zeros((30, 2), dtype=np.int64)
    ids = torch.from_numpy(buf)
    w = torch.full((30, 2), 0.5)
    buf[:] = fixed_routing(30, 2, 8)[0].numpy()
    first = moe(x, routing=(ids, w))
    buf[:] = fixed_routing(30, 2, 8)[0].numpy()
    torch.testing.assert_close(moe(x, routing=(ids, w)), moe(x, routing=(ids.clone(), w)))
    assert not torch.allclose(moe(x, routing=(ids, w)), first)


def test_moe_under_inference_mode():
    moe = gnn.MoE(16, 8, 8, 2, router="softmax")
    x = torch.randn(30, 16)
    expected = moe(x)
    with torch.inference_mode():
        ids, w = fixed_routing(30, 2, 8)
        torch.testing.assert_close(moe(x), expected)
        moe(x, routing=(ids, w))
        moe(x, routing=gnn.Routing.prepare(ids, w, 8))


@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_moe_compiles_fullgraph(activation):
    torch._dynamo.reset()
    moe = gnn.MoE(16, 8, 8, 2, router="softmax", activation=activation)
    x = torch.randn(37, 16, requires_grad=True)
    compiled = torch.compile(moe, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.square().sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in moe.parameters()]
    x.grad = None
    moe.zero_grad()
    expected = moe(x)
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected)
    for got, want in zip(grads, [x.grad] + [p.grad for p in moe.parameters()]):
        torch.testing.assert_close(got, want)


def test_expert_mlp_op_passes_opcheck():
    rows = torch.randn(20, 16, dtype=torch.float64)
    offsets = torch.tensor([0, 5, 5, 12, 20])
    gate_up = torch.randn(4, 12, 16, dtype=torch.float64, requires_grad=True)
    down = torch.randn(4, 16, 6, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.grouter.expert_mlp.default, (rows.requires_grad_(), offsets, gate_up, down, "silu"))
    torch.autograd.gradcheck(lambda r, a, b: grouter.ops.expert_mlp(r, offsets, a, b, "gelu"), (rows, gate_up, down))


def test_fixed_routing_has_no_router_parameters():
    moe = gnn.MoE(16, 8, 8, 2)
    assert {n for n, _ in moe.named_parameters()} == {"experts.gate_up_proj", "experts.down_proj"}
    assert moe.aux_loss is None


def test_activation_memory_is_rows_and_gate_up_only():
    # Saved for backward by the expert MLP: its input rows [N, H] and h [N, 2I], nothing [N, I].
    H, I = 12, 10
    moe = gnn.MoE(H, I, 4, 2)
    x = torch.randn(40, H, requires_grad=True)
    ids, w = fixed_routing(40, 2, 4)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        moe(x, routing=(ids, w))
    per_row = sorted(s for s in saved if len(s) == 2 and s[0] == 80)
    assert per_row == [(80, H), (80, 2 * I)], saved


def test_inconsistent_plans_are_refused():
    ids, w = fixed_routing(20, 2, 8)
    plan = grouter.ops.routing_plan(ids, 8)
    other = grouter.ops.routing_plan(fixed_routing(20, 2, 8)[0], 8)
    with pytest.raises(ValueError, match="not built from these expert ids"):
        gnn.Routing(ids, w, other)
    lowered = plan.expert_offsets.clone()
    lowered[-1] -= 1
    with pytest.raises(ValueError, match="tile"):
        gnn.Routing(ids, w, grouter.ops.RoutingPlan(plan.sorted_tokens, plan.row_of, lowered))
    moe = gnn.MoE(16, 8, 8, 2)
    rows = torch.randn(40, 16)
    with pytest.raises(ValueError, match="expert offsets must rise from 0 to the 40 rows"):
        moe.experts(rows, lowered)
    gnn.Routing(ids, w, plan)  # the right plan, built elsewhere, is accepted


def test_a_prepared_routing_changed_in_place_is_refused():
    # An edited plan (offsets still rising from 0 to T*K) would run a row through the wrong expert.
    moe = gnn.MoE(8, 4, 4, 2)
    x = torch.randn(5, 8)
    ids = torch.rand(5, 4).topk(2, 1).indices
    for tamper in (lambda r: r.plan.expert_offsets[1].add_(1), lambda r: r.expert_ids[0].copy_(r.expert_ids[1]),
                   lambda r: r.plan.row_of.fill_(0)):
        r = gnn.Routing.prepare(ids.clone(), torch.rand(5, 2), 4)
        moe(x, routing=r)
        tamper(r)
        with pytest.raises(ValueError, match="changed in place"):
            moe(x, routing=r)
    # Inference tensors keep no version counter: there the plan is checked against the ids at use.
    ids = torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0], [0, 2]])
    with torch.inference_mode():
        for tamper in (lambda r: r.plan.expert_offsets[1].add_(1), lambda r: r.expert_ids[0].copy_(r.expert_ids[1]),
                       lambda r: r.plan.row_of.copy_(r.plan.row_of.flip(0))):
            r = gnn.Routing.prepare(ids.clone(), torch.rand(5, 2), 4)
            assert moe(x, routing=r).shape == (5, 8)
            tamper(r)
            with pytest.raises(ValueError, match="changed in place"):
                moe(x, routing=r)
