"""Property tests: random shapes (T 0..thousands, K 1..E, E 1..256), every op against the spec."""

import pytest
import torch

pytest.importorskip("hypothesis")  # CI installs it; a bare GPU machine may not have it
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import reference as ref
from grouter import ops

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@st.composite
def routings(draw):
    E = draw(st.integers(1, 256))
    K = draw(st.integers(1, min(E, 16) if draw(st.booleans()) else E))
    T = draw(st.integers(0, 4000 // K))
    seed = draw(st.integers(0, 2**31 - 1))
    id_dtype = draw(st.sampled_from([torch.int32, torch.int64]))
    gen = torch.Generator().manual_seed(seed)
    return ref.random_routing(T, K, E, dtype=id_dtype, generator=gen), E, gen


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(routings())
def test_routing_plan_and_coactivation(routing):
    ids, E, _ = routing
    plan = ops.routing_plan(ids, E)
    sorted_tokens, row_of, offsets = ref.routing_plan(ids, E)
    assert torch.equal(plan.sorted_tokens, sorted_tokens)
    assert torch.equal(plan.row_of, row_of)
    assert torch.equal(plan.expert_offsets, offsets)
    assert torch.equal(ops.coactivation(ids, E), ref.coactivation(ids, E))


@SETTINGS
@given(routings(), st.integers(0, 80), st.sampled_from(DTYPES), st.sampled_from(DTYPES), st.booleans())
def test_permute_unpermute_and_grads(routing, H, dtype, w_dtype, weighted):
    ids, E, gen = routing
    T, K = ids.shape
    plan = ops.routing_plan(ids, E)
    x = torch.randn(T, H, generator=gen).to(dtype).requires_grad_(True)
    w = torch.rand(T, K, generator=gen).to(w_dtype).requires_grad_(True) if weighted else None
    permuted = ops.permute(x, plan)
    assert torch.equal(permuted, ref.permute(x.detach(), plan.row_of))
    y = torch.randn(T * K, H, generator=gen).to(dtype).requires_grad_(True)
    out = ops.unpermute(y, plan, w)
    wd = None if w is None else w.detach()
    assert torch.equal(out, ref.unpermute(y.detach(), plan.row_of, wd))
    g = torch.randn(T, H, generator=gen).to(dtype)
    out.backward(g)
    grad_y, grad_w = ref.unpermute_backward(g, plan.row_of, wd, y.detach())
    assert torch.equal(y.grad, grad_y)
    if weighted:
        tol = 1e-10 if torch.float64 in (dtype, w_dtype) else 2e-2 if w_dtype in (torch.bfloat16, torch.float16) else 1e-4
        torch.testing.assert_close(w.grad, grad_w, rtol=tol, atol=tol * (H + 1) ** 0.5)
    gp = torch.randn(T * K, H, generator=gen).to(dtype)
    permuted.backward(gp)
    assert torch.equal(x.grad, ref.unpermute(gp, plan.row_of))
