"""grouter.ops.glu (fused gated activation) against torch's own activations, forward and backward."""

import pytest
import torch
import torch.nn.functional as F

import reference as ref
from grouter import ops

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def assert_close_to(got, want64, dtype):
    """Against an fp64 reference: elementwise rtol, plus an atol of (a few) ulp of the tensor's
    largest magnitude. fp32: the kernels' exp/erf approximations sit within 2x of torch's own fp32
    error (cancellations near act'(g) = 0 and in GELU's tails are absolute, not relative); half
    types: one rounding of the output on top of fp32 math."""
    eps = torch.finfo(dtype).eps
    # Inputs are O(1-10): an output near 0 comes from cancelling O(1) terms, so the absolute
    # error is measured against at least 1.
    scale = max(float(want64.detach().abs().max()), 1.0) if want64.numel() else 1.0
    rtol, atol = (2e-5, 4e-6 * scale) if dtype == torch.float32 else (2 * eps, 2 * eps * scale)
    torch.testing.assert_close(got.double(), want64, rtol=rtol, atol=atol)


def random_h(shape, dtype, device, scale=3.0):
    return (torch.randn(shape, device=device) * scale).to(dtype)


@pytest.mark.parametrize("activation", ops.GLU_ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0, 8), (1, 2), (7, 74), (300, 512), (3, 5, 64), (4, 2200)])
def test_forward_and_backward_match_torch(activation, dtype, shape, device):
    h = random_h(shape, dtype, device).requires_grad_(True)
    grad_a = torch.randn(*shape[:-1], shape[-1] // 2, device=device).to(dtype)
    a = ops.glu(h, activation)
    (grad_h,) = torch.autograd.grad(a, h, grad_a)
    h64 = h.detach().double().requires_grad_(True)
    a_ref = ref.glu(h64, activation)
    (grad_ref,) = torch.autograd.grad(a_ref, h64, grad_a.double())
    assert a.dtype == dtype and a.shape == a_ref.shape and grad_h.dtype == dtype
    assert_close_to(a, a_ref, dtype)
    assert_close_to(grad_h, grad_ref, dtype)
    a_again, grad_again = torch.ops.grouter.glu_backward(grad_a, h.detach(), activation)
    assert torch.equal(a_again, a.detach()) and torch.equal(grad_again, grad_h)  # a is recomputed bitwise


@pytest.mark.parametrize("activation", ops.GLU_ACTIVATIONS)
def test_extreme_inputs_stay_finite_and_right(activation, device):
    g = torch.tensor([-200.0, -88.0, -30.0, -4.5, -1e-20, 0.0, 1e-20, 4.5, 30.0, 88.0, 200.0], device=device)
    h = torch.cat([g, torch.ones_like(g)]).requires_grad_(True)
    a = ops.glu(h, activation)
    (grad,) = torch.autograd.grad(a.sum(), h)
    h_ref = h.detach().double().requires_grad_(True)
    a_ref = ref.glu(h_ref, activation)
    (grad_ref,) = torch.autograd.grad(a_ref.sum(), h_ref)
    assert torch.isfinite(a).all() and torch.isfinite(grad).all()
    assert_close_to(a, a_ref, torch.float32)
    assert_close_to(grad, grad_ref, torch.float32)


def whole_range(dtype):
    """Gates over the dtype's whole finite range, both signs: log-spaced magnitudes from the
    smallest normal to the largest finite value, and 0."""
    info = torch.finfo(dtype)
    mags = torch.logspace(torch.tensor(info.tiny).log10().item(), torch.tensor(info.max).log10().item(), 997,
                          dtype=torch.float64).clamp(max=info.max)
    return torch.cat([-mags.flip(0), torch.zeros(1, dtype=torch.float64), mags, torch.tensor([info.max, -info.max])]).to(dtype)


@pytest.mark.parametrize("activation", ops.GLU_ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_limits_over_the_whole_float_range(activation, dtype, device):
    # Up to +-FLT_MAX (and the half types' maxima): silu(-1e38) is 0, not -0.4156, and gelu's
    # slope at 1e38 is 1, not 1.486 (exp underflows to 0 there instead of stopping at exp(-87.3)).
    g = whole_range(dtype).to(device)
    h = torch.stack([g, torch.ones_like(g)], -1).reshape(len(g), 2)
    a, grad_h = torch.ops.grouter.glu_backward(torch.ones(len(g), 1, device=device, dtype=dtype), h, activation)
    g64 = g.double().cpu().requires_grad_(True)
    want = ref.glu(torch.stack([g64, torch.ones_like(g64)], -1), activation)
    (slope,) = torch.autograd.grad(want.sum(), g64)
    got_a, got_slope = a[:, 0].double().cpu(), grad_h[:, 0].double().cpu()
    assert torch.isfinite(got_a).all() and torch.isfinite(got_slope).all()
    eps = torch.finfo(dtype).eps
    tol = 4e-6 if dtype == torch.float32 else 2 * eps
    # Relative to the value (O(|g|) on the positive side) or absolute where it is O(1) or below.
    torch.testing.assert_close(got_a, want.detach()[:, 0], rtol=tol, atol=tol)
    torch.testing.assert_close(got_slope, slope, rtol=tol, atol=tol)


@pytest.mark.parametrize("activation", ops.GLU_ACTIVATIONS)
def test_infinite_gates_give_what_torch_gives(activation, device):
    # At +-inf the values are torch's (silu(-inf) and gelu(-inf) are NaN there, inf * 0; +inf
    # stays inf). The slopes: silu and gelu NaN (as torch's backward), gelu_tanh its limits 0 and
    # 1 (tanh saturates before g * g overflows), relu 0 and 1.
    g = torch.tensor([float("-inf"), float("inf")], device=device)
    h = torch.stack([g, torch.ones_like(g)], -1)
    a, grad_h = torch.ops.grouter.glu_backward(torch.ones(2, 1, device=device), h, activation)
    want = ref.glu(h.double().cpu(), activation)[:, 0]
    torch.testing.assert_close(a[:, 0].double().cpu(), want, equal_nan=True)
    slopes = {"silu": [float("nan")] * 2, "gelu": [float("nan")] * 2, "gelu_tanh": [0.0, 1.0], "relu": [0.0, 1.0]}
    torch.testing.assert_close(grad_h[:, 0].cpu(), torch.tensor(slopes[activation]), equal_nan=True)


def test_non_contiguous_input_and_thread_count_give_the_same_bits(device):
    h = random_h((512, 300), torch.float32, device).T  # [300, 512] strided view
    a = ops.glu(h, "silu")
    assert torch.equal(a, ops.glu(h.contiguous(), "silu"))
    if device == "cpu":
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            assert torch.equal(ops.glu(h, "silu"), a)
        finally:
            torch.set_num_threads(threads)


def test_opcheck(device):
    for dtype in DTYPES:
        h = random_h((33, 40), dtype, device).requires_grad_(True)
        torch.library.opcheck(torch.ops.grouter.glu.default, (h, "silu"))
        torch.library.opcheck(torch.ops.grouter.glu_backward.default,
                              (torch.randn(33, 20, device=device).to(dtype), h.detach(), "gelu"))


def test_compiles_fullgraph(device):
    h = random_h((16, 64), torch.float32, device).requires_grad_(True)
    fn = torch.compile(lambda t: ops.glu(t, "gelu_tanh").square().sum(), fullgraph=True, backend="aot_eager")
    out = fn(h)
    (grad,) = torch.autograd.grad(out, h)
    h2 = h.detach().clone().requires_grad_(True)
    out2 = ops.glu(h2, "gelu_tanh").square().sum()
    out2.backward()
    torch.testing.assert_close(out, out2)
    torch.testing.assert_close(grad, h2.grad)


@pytest.mark.parametrize("h,activation,match", [
    (torch.randn(4, 7), "silu", "even dimension"),
    (torch.randn(4, 8, dtype=torch.float64), "silu", "float32, bfloat16 or float16"),
    (torch.ones(4, 8, dtype=torch.int32), "silu", "float32, bfloat16 or float16"),
    (torch.randn(()), "silu", "even dimension"),
    (torch.randn(4, 8), "swish", "unknown activation"),
])
def test_bad_input_raises(h, activation, match):
    with pytest.raises(ValueError, match=match):
        ops.glu(h, activation)
    with pytest.raises(ValueError, match=match):
        ops.glu(h.to("meta"), activation)


def test_bad_grad_raises():
    h = torch.randn(4, 8)
    for grad in (torch.randn(4, 8), torch.randn(4, 4, dtype=torch.bfloat16), torch.randn(3, 4)):
        with pytest.raises(ValueError, match="grad_a must be"):
            torch.ops.grouter.glu_backward(grad, h, "silu")


def test_no_second_derivative():
    h = torch.randn(4, 8, requires_grad=True)
    (g,) = torch.autograd.grad(ops.glu(h, "silu").sum(), h, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives"):
        g.sum().backward()
