import pytest
import torch

import reference as ref
from grouter import ops

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SHAPES = [  # (T, K, E, H); H not a multiple of the kernels' 16-lane / 512-column blocks too
    (0, 2, 4, 8), (3, 2, 4, 0), (1, 1, 1, 1), (17, 3, 3, 5), (64, 8, 8, 33),
    (200, 2, 16, 1000), (300, 4, 256, 72), (2048, 2, 16, 1024), (64, 1, 4, 1537),
]


def make(T, K, E, H, dtype, device, w_dtype=torch.float32):
    ids = ref.random_routing(T, K, E, device=device)
    plan = ops.routing_plan(ids, E)
    y = torch.randn(T * K, H, device=device).to(dtype)
    w = torch.rand(T, K, device=device).to(w_dtype)
    return plan, y, w


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,K,E,H", SHAPES)
def test_forward_matches_reference(T, K, E, H, dtype, weighted, device):
    plan, y, w = make(T, K, E, H, dtype, device)
    w = w if weighted else None
    out = ops.unpermute(y, plan, w)
    assert out.shape == (T, H) and out.dtype == dtype
    assert torch.equal(out, ref.unpermute(y, plan.row_of, w))


@pytest.mark.parametrize("w_dtype", DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_weights_have_their_own_dtype(dtype, w_dtype, device):
    plan, y, w = make(150, 3, 8, 40, dtype, device, w_dtype)
    assert torch.equal(ops.unpermute(y, plan, w), ref.unpermute(y, plan.row_of, w))


def test_zero_k_gives_zeros(device):
    plan = ops.routing_plan(torch.empty(5, 0, dtype=torch.long, device=device), 3)
    y = torch.empty(0, 4, device=device)
    assert torch.equal(ops.unpermute(y, plan, torch.empty(5, 0, device=device)), torch.zeros(5, 4, device=device))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,K,E,H", SHAPES)
def test_backward_matches_reference(T, K, E, H, dtype, device):
    plan, y, w = make(T, K, E, H, dtype, device)
    y.requires_grad_(True)
    w.requires_grad_(True)
    g = torch.randn(T, H, device=device).to(dtype)
    ops.unpermute(y, plan, w).backward(g)
    grad_y, grad_w = ref.unpermute_backward(g, plan.row_of, w.detach(), y.detach())
    assert torch.equal(y.grad, grad_y)
    assert w.grad.dtype == w.dtype
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-4)
    torch.testing.assert_close(w.grad, grad_w, rtol=tol, atol=tol * max(H, 1) ** 0.5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_unweighted_is_permute(dtype, device):
    plan, y, _ = make(100, 2, 8, 24, dtype, device)
    y.requires_grad_(True)
    g = torch.randn(100, 24, device=device).to(dtype)
    ops.unpermute(y, plan).backward(g)
    assert torch.equal(y.grad, ref.permute(g, plan.row_of))


def test_backward_only_weights_or_only_y(device):
    plan, y, w = make(64, 4, 8, 16, torch.float32, device)
    g = torch.randn(64, 16, device=device)
    grad_y, grad_w = ref.unpermute_backward(g, plan.row_of, w, y)
    w1 = w.clone().requires_grad_(True)
    ops.unpermute(y, plan, w1).backward(g)
    torch.testing.assert_close(w1.grad, grad_w)
    y1 = y.clone().requires_grad_(True)
    ops.unpermute(y1, plan, w).backward(g)
    assert torch.equal(y1.grad, grad_y)


def test_gradcheck():
    plan, y, w = make(11, 3, 5, 6, torch.float64, "cpu", torch.float64)
    y.requires_grad_(True)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda y, w: ops.unpermute(y, plan, w), (y, w))
    assert torch.autograd.gradcheck(lambda y: ops.unpermute(y, plan), (y,))


def test_float64_stays_float64(device):
    # fp64 weights with fp32 activations accumulate in fp64 (then round once to fp32).
    plan, y, w = make(50, 4, 8, 32, torch.float32, device, torch.float64)
    out = ops.unpermute(y, plan, w)
    assert out.dtype == torch.float32
    assert torch.equal(out, ref.unpermute(y, plan.row_of, w))


def test_nan_weights_propagate(device):
    plan, y, w = make(20, 2, 4, 8, torch.float32, device)
    w[3, 1] = float("nan")
    w.requires_grad_(True)
    y.requires_grad_(True)
    out = ops.unpermute(y, plan, w)
    assert torch.isnan(out[3]).all() and not torch.isnan(out[torch.arange(20, device=device) != 3]).any()
    out.sum().backward()
    assert torch.isnan(y.grad[plan.row_of[3, 1]]).all()


def test_non_contiguous_inputs(device):
    plan, y, w = make(120, 2, 8, 64, torch.float32, device)
    yt = y.T.contiguous().T
    wt = w.T.contiguous().T
    assert torch.equal(ops.unpermute(yt, plan, wt), ref.unpermute(y, plan.row_of, w))
    expanded = torch.ones(1, 1, device=device).expand(120, 2)  # stride-0 weights
    assert torch.equal(ops.unpermute(y, plan, expanded), ref.unpermute(y, plan.row_of, expanded))


def test_roundtrip_recovers_input(device):
    plan, _, _ = make(256, 4, 16, 1, torch.float32, device)
    x = torch.randn(256, 48, device=device)
    w = torch.full((256, 4), 0.25, device=device)
    torch.testing.assert_close(ops.unpermute(ops.permute(x, plan), plan, w), x)


def test_second_derivatives_raise_instead_of_silent_zeros():
    from grouter import ops

    ids = torch.tensor([[0, 1], [1, 2]])
    plan = ops.routing_plan(ids, 3)
    y = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, 2, dtype=torch.float64, requires_grad=True)
    out = ops.unpermute(y, plan, w)
    (gy,) = torch.autograd.grad(out.square().sum(), y, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives are not implemented"):
        gy.sum().backward()
    # first derivatives are unaffected
    out = ops.unpermute(y, plan, w)
    out.sum().backward()
    assert y.grad is not None and w.grad is not None
