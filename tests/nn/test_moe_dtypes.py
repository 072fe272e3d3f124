"""grouter.nn.MoE in fp32, bf16 and fp16 (the fused gated activation) and under torch.autocast,
against the per-expert reference in fp64."""

import pytest
import torch

import reference as ref
from grouter import nn as gnn

# Stated tolerances: fp32 ~ a few ulp of the activation plus GEMM reassociation; half types:
# their rounding of inputs, h and outputs.
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
       torch.float16: dict(rtol=1e-2, atol=1e-2)}


def routed(T, K, E, device):
    ids = ref.random_routing(T, K, E, device=device)
    w = torch.rand(T, K, device=device)
    return ids, w / w.sum(1, keepdim=True)


def reference_grads(moe, x, ids, w, g):
    params = (moe.experts.gate_up_proj, moe.experts.down_proj)
    x64 = x.detach().double().requires_grad_(True)
    p64 = [p.detach().double().requires_grad_(True) for p in params]
    out = ref.moe_experts(x64, ids, w.double(), *p64, act=lambda h: ref.glu(h, moe.experts.activation))
    return out, torch.autograd.grad(out, (x64, *p64), g.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu"])
def test_moe_in_dtype_matches_fp64_reference(dtype, activation, device):
    T, H, I, E, K = 96, 32, 24, 8, 2
    moe = gnn.MoE(H, I, E, K, activation=activation).to(device=device, dtype=dtype)
    x = torch.randn(T, H, device=device, dtype=dtype, requires_grad=True)
    ids, w = routed(T, K, E, device)
    out = moe(x, routing=(ids, w.to(dtype)))
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, moe.experts.gate_up_proj, moe.experts.down_proj), g)
    want, want_grads = reference_grads(moe, x, ids, w.to(dtype).float(), g)
    assert out.dtype == dtype and all(t.dtype == dtype for t in grads)
    scale = want.abs().max()
    torch.testing.assert_close(out.double() / scale, want / scale, **TOL[dtype])
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a.double() / b.abs().max(), b / b.abs().max(), **TOL[dtype])


def test_autocast_bf16_runs_the_experts_in_bf16_with_fp32_parameters(device):
    T, H, I, E, K = 64, 32, 16, 8, 2
    moe = gnn.MoE(H, I, E, K).to(device)
    x = torch.randn(T, H, device=device, requires_grad=True)
    ids, w = routed(T, K, E, device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = moe(x, routing=(ids, w))
    assert out.dtype == torch.bfloat16
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, moe.experts.gate_up_proj, moe.experts.down_proj), g)
    assert all(t.dtype == torch.float32 for t in grads)  # through the casts, to the fp32 leaves
    want, want_grads = reference_grads(moe, x, ids, w, g.float())
    scale = want.abs().max()
    torch.testing.assert_close(out.double() / scale, want / scale, **TOL[torch.bfloat16])
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a.double() / b.abs().max(), b / b.abs().max(), **TOL[torch.bfloat16])


def test_autocast_with_a_learned_router(device):
    moe = gnn.MoE(32, 16, 8, 2, router="softmax").to(device)
    x = torch.randn(50, 32, device=device, requires_grad=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = moe(x)
        loss = out.float().square().mean() + 0.01 * moe.aux_loss
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in moe.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fixed_routing_compiles_fullgraph(dtype):
    torch._dynamo.reset()
    moe = gnn.MoE(32, 16, 8, 2).to(dtype)
    x = torch.randn(45, 32, dtype=dtype, requires_grad=True)
    ids, w = routed(45, 2, 8, "cpu")
    compiled = torch.compile(moe, fullgraph=True, backend="aot_eager")
    out = compiled(x, routing=(ids, w.to(dtype)))
    grads = torch.autograd.grad(out.float().square().sum(), (x, *moe.parameters()))
    eager = moe(x, routing=(ids, w.to(dtype)))
    want = torch.autograd.grad(eager.float().square().sum(), (x, *moe.parameters()))
    assert torch.equal(out, eager)  # the same kernels in the same order
    for a, b in zip(grads, want):
        assert torch.equal(a, b)
