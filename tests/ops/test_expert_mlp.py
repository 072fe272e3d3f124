"""grouter::expert_mlp (and its backward) against the per-expert reference: forward, gradients,
determinism, edge cases and bad input."""

import pytest
import torch

import reference as ref
from grouter import ops  # noqa: F401  (loads the library)
from grouter.ops import expert_mlp

# Against an fp64 reference, relative to the largest magnitude: fp32 ~ GEMM reassociation and the
# activation's few ulp; half types: their rounding of inputs, h and outputs.
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
       torch.float16: dict(rtol=5e-3, atol=5e-3), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def random_offsets(N, E, empty=0.3, device="cpu"):
    """[E+1] offsets tiling N rows, about a fraction `empty` of the experts without rows."""
    share = torch.rand(E) * (torch.rand(E) > empty)
    if share.sum() == 0:
        share[0] = 1
    counts = (share / share.sum() * N).floor().long()
    counts[int(share.argmax())] += N - int(counts.sum())
    return torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(device)


def weights(E, H, I, dtype, device):
    return ((torch.randn(E, 2 * I, H, device=device) / H**0.5).to(dtype).requires_grad_(True),
            (torch.randn(E, H, I, device=device) / I**0.5).to(dtype).requires_grad_(True))


def assert_scaled_close(got, want, dtype):
    got, want = got.detach().double(), want.detach().double()
    scale = max(float(want.abs().max()), 1e-30) if want.numel() else 1.0
    torch.testing.assert_close(got / scale, want / scale, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("N,H,I,E", [(0, 8, 4, 3), (1, 8, 4, 1), (37, 16, 12, 1), (150, 32, 24, 8), (90, 8, 6, 300)])
def test_matches_per_expert_reference(dtype, activation, N, H, I, E, device):
    rows = torch.randn(N, H, device=device).to(dtype).requires_grad_(True)
    offsets = random_offsets(N, E, device=device)
    gate_up, down = weights(E, H, I, dtype, device)
    out, h = torch.ops.grouter.expert_mlp(rows, offsets, gate_up, down, activation)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (rows, gate_up, down), g)
    params64 = [t.detach().double().requires_grad_(True) for t in (rows, gate_up, down)]
    want, want_h = ref.expert_mlp(params64[0], offsets, *params64[1:], activation)
    want_grads = torch.autograd.grad(want, params64, g.double()) if N else [torch.zeros_like(p) for p in params64]
    assert out.dtype == h.dtype == dtype and not h.requires_grad
    assert_scaled_close(h, want_h, dtype)
    assert_scaled_close(out, want, dtype)
    for got, exp in zip(grads, want_grads):
        assert got.dtype == dtype
        assert_scaled_close(got, exp, dtype)


def test_experts_without_rows_get_zero_gradients(device):
    rows = torch.randn(10, 8, device=device)
    gate_up, down = weights(4, 8, 4, torch.float32, device)
    offsets = torch.tensor([0, 0, 10, 10, 10], device=device)
    out, _ = torch.ops.grouter.expert_mlp(rows, offsets, gate_up, down, "silu")
    grad_gate_up, grad_down = torch.autograd.grad(out.sum(), (gate_up, down))
    for e in (0, 2, 3):
        assert not grad_gate_up[e].any() and not grad_down[e].any()
    assert grad_gate_up[1].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_backward_are_bitwise_reproducible(dtype, device):
    rows = torch.randn(500, 64, device=device).to(dtype)
    offsets = random_offsets(500, 8, device=device)
    gate_up, down = weights(8, 64, 48, dtype, device)
    grad_out = torch.randn(500, 64, device=device).to(dtype)

    def run():
        out, h = torch.ops.grouter.expert_mlp(rows, offsets, gate_up, down, "silu")
        return (out, h, *torch.ops.grouter.expert_mlp_backward(grad_out, rows, h, offsets, gate_up, down, "silu"))

    first = run()
    for _ in range(3):
        assert all(torch.equal(a, b) for a, b in zip(first, run()))


def test_passes_opcheck_in_each_dtype(device):
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        rows = torch.randn(20, 16, device=device).to(dtype).requires_grad_(True)
        gate_up, down = weights(4, 16, 6, dtype, device)
        offsets = torch.tensor([0, 5, 5, 12, 20], device=device)
        torch.library.opcheck(torch.ops.grouter.expert_mlp.default, (rows, offsets, gate_up, down, "gelu"))


def test_autocast_runs_the_op_in_bf16(device):
    rows = torch.randn(40, 16, device=device, requires_grad=True)
    gate_up, down = weights(4, 16, 8, torch.float32, device)
    offsets = torch.tensor([0, 10, 20, 30, 40], device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = expert_mlp(rows, offsets, gate_up, down, "silu")
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert gate_up.grad.dtype == torch.float32 and rows.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_composite_kernel_other_devices_run_matches_the_cpu_kernel(dtype):
    # CUDA and other devices run the Python composite; here it is checked against the C++ kernel.
    from grouter.ops import experts as expert_mlp_op

    rows = torch.randn(120, 16, dtype=dtype)
    offsets = random_offsets(120, 6)
    gate_up, down = (t.detach() for t in weights(6, 16, 10, dtype, "cpu"))
    out, h = torch.ops.grouter.expert_mlp(rows, offsets, gate_up, down, "gelu")
    out_c, h_c = expert_mlp_op._expert_mlp_composite(rows, offsets, gate_up, down, "gelu")
    grad_out = torch.randn_like(out)
    grads = torch.ops.grouter.expert_mlp_backward(grad_out, rows, h, offsets, gate_up, down, "gelu")
    grads_c = expert_mlp_op._expert_mlp_backward_composite(grad_out, rows, h, offsets, gate_up, down, "gelu")
    for a, b in zip((out, h, *grads), (out_c, h_c, *grads_c)):
        assert_scaled_close(a, b, dtype)
    with pytest.raises(ValueError, match="7 values"):
        expert_mlp_op._expert_mlp_composite(rows, offsets[:3], gate_up, down, "gelu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_kernel_cuda_runs_matches_the_composite(monkeypatch, dtype):
    # The op's CUDA kernel (torch's grouped_mm in bf16), run here through torch's CPU grouped_mm:
    # the grouping, the transposes, zero gradients of experts without rows and the validation.
    from grouter.ops import experts as expert_mlp_op

    monkeypatch.setattr(expert_mlp_op, "_grouped_mm_ok", lambda x, w, d: True)
    N, H, I, E = 150, 32, 24, 8
    rows = torch.randn(N, H).to(dtype)
    counts = torch.tensor([20, 0, 35, 0, 0, 40, 30, 25])[torch.randperm(E)]  # three experts without rows
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    gate_up, down = (t.detach() for t in weights(E, H, I, dtype, "cpu"))
    out, h = expert_mlp_op._expert_mlp_grouped(rows, offsets, gate_up, down, "silu")
    out_c, h_c = expert_mlp_op._expert_mlp_composite(rows, offsets, gate_up, down, "silu")
    grad_out = torch.randn_like(out)
    grads = expert_mlp_op._expert_mlp_backward_grouped(grad_out, rows, h, offsets, gate_up, down, "silu")
    grads_c = expert_mlp_op._expert_mlp_backward_composite(grad_out, rows, h, offsets, gate_up, down, "silu")
    for a, b in zip((out, h, *grads), (out_c, h_c, *grads_c)):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert_scaled_close(a, b, dtype)
    empty = offsets.diff() == 0
    assert all(bool((g[empty] == 0).all()) for g in grads[1:])
    bad = offsets.clone()
    bad[-1] -= 1  # trailing row uncovered: grouped_mm would leave it unwritten
    with pytest.raises(ValueError, match="expert offsets"):
        expert_mlp_op._expert_mlp_grouped(rows, bad, gate_up, down, "silu")
    ops.set_cuda_checks(False)  # no host copy then; the offsets' shape is still checked
    try:
        with pytest.raises(ValueError, match="9 values"):
            expert_mlp_op._expert_mlp_grouped(rows, offsets[:-1], gate_up, down, "silu")
    finally:
        ops.set_cuda_checks(True)


def _bad(device):
    rows = torch.randn(6, 4, device=device)
    gate_up, down = torch.randn(2, 6, 4, device=device), torch.randn(2, 4, 3, device=device)
    offs = torch.tensor([0, 2, 6], device=device)
    return rows, offs, gate_up, down


BAD_CASES = {
    "offsets_short_of_rows": (lambda r, o, a, b: (r, o.new_tensor([0, 2, 5]), a, b), "expert offsets"),
    "offsets_falling": (lambda r, o, a, b: (r, o.new_tensor([0, 7, 6]), a, b), "expert offsets"),
    "offsets_for_other_experts": (lambda r, o, a, b: (r, o.new_tensor([0, 2, 4, 6]), a, b), "3 values"),
    "offsets_2d": (lambda r, o, a, b: (r, o[None], a, b), "expert"),
    "gate_up_other_hidden": (lambda r, o, a, b: (r, o, a[:, :, :3], b), "gate_up_proj"),
    "gate_up_odd": (lambda r, o, a, b: (r, o, a[:, :5], b), "gate_up_proj"),
    "down_other_shape": (lambda r, o, a, b: (r, o, a, b[:, :, :2]), "down_proj"),
    "rows_3d": (lambda r, o, a, b: (r[None], o, a, b), "rows"),
    "rows_int": (lambda r, o, a, b: (r.long(), o, a, b), "rows"),
    "mixed_dtypes": (lambda r, o, a, b: (r, o, a.double(), b), "dtype"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_raises_value_error(case, device):
    change, word = BAD_CASES[case]
    with pytest.raises(ValueError, match=word):
        torch.ops.grouter.expert_mlp(*change(*_bad(device)), "silu")


def test_bad_activation_and_backward_shapes_raise(device):
    rows, offs, gate_up, down = _bad(device)
    with pytest.raises(ValueError, match="unknown activation"):
        torch.ops.grouter.expert_mlp(rows, offs, gate_up, down, "tanh")
    out, h = torch.ops.grouter.expert_mlp(rows, offs, gate_up, down, "silu")
    with pytest.raises(ValueError, match="grad_out"):
        torch.ops.grouter.expert_mlp_backward(out[:3], rows, h, offs, gate_up, down, "silu")
    with pytest.raises(ValueError, match="h"):
        torch.ops.grouter.expert_mlp_backward(out, rows, h[:, :4], offs, gate_up, down, "silu")


@pytest.mark.parametrize("where", ["weights", "down_proj", "offsets", "rows"])
def test_meta_and_real_inputs_mixed_raise(where):
    # The fake kernel runs when any input is on the meta device; it must refuse mixed devices
    # (else: uninitialised real memory returned), forward, backward and through ops.expert_mlp.
    import grouter.nn as gnn

    rows, off = torch.randn(6, 4), torch.tensor([0, 3, 6])
    gu, dn = torch.randn(2, 8, 4), torch.randn(2, 4, 4)
    args = {"weights": (rows, off, gu.to("meta"), dn.to("meta")), "down_proj": (rows, off, gu, dn.to("meta")),
            "offsets": (rows, off.to("meta"), gu, dn), "rows": (rows.to("meta"), off, gu, dn)}[where]
    with pytest.raises(ValueError, match="different devices"):
        torch.ops.grouter.expert_mlp(*args, "silu")
    with pytest.raises(ValueError, match="different devices"):
        expert_mlp(*args, "silu")
    r, o, g, d = args
    with pytest.raises(ValueError, match="different devices"):
        torch.ops.grouter.expert_mlp_backward(r, r, torch.empty(6, 8, device=r.device), o, g, d, "silu")
