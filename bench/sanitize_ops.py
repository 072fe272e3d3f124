"""Every grouter op once on small CUDA inputs, for compute-sanitizer (memcheck, racecheck).

    compute-sanitizer --tool memcheck python bench/sanitize_ops.py   (python bench/sanitize_ops.py cpu:
    only to check the script)

Forward and backward of each op in fp32, bf16, fp16 and fp64, with checks on and off, an empty
input, misaligned row views; with checks off also invalid ids and a corrupt plan (the kernels must
skip them, not write or read past a tensor); coactivation with a shared tile over the 48 KB
default (E=200) and with global counters (E=1024); the expert MLP (bf16: torch's grouped_mm
kernel; fp32: the composite). Synchronizes at the end so any fault surfaces before exit.
"""

import sys

import torch

from grouter import ops


def run(dtype, checks, dev):
    ops.set_cuda_checks(checks)
    for T, H, K, E in ((0, 8, 2, 4), (37, 24, 2, 8), (300, 130, 4, 64), (64, 32, 8, 8)):
        ids = torch.rand(T, E, device=dev).topk(K, dim=1).indices
        plan = ops.routing_plan(ids, E)
        x = torch.randn(T, H, device=dev, dtype=dtype, requires_grad=True)
        w = torch.rand(T, K, device=dev, requires_grad=True)
        rows = ops.permute(x, plan)
        out = ops.unpermute(rows * 2, plan, w)
        out.float().sum().backward()
        ops.unpermute(rows.detach(), plan)
        ops.coactivation(ids, E)
        flat = torch.randn(T * K * H + 1, device=dev).to(dtype)[1:].view(T * K, H)  # misaligned rows
        ops.unpermute(flat, plan, w.detach())
        ops.permute(flat[:T], plan)
        torch.ops.grouter.unpermute_backward(flat[:T], plan.row_of, w.detach(), flat)  # misaligned grad_w rows
        if dtype != torch.float64:
            h = torch.randn(T * K, 2 * H, device=dev, dtype=dtype, requires_grad=True)
            for act in ops.ACTIVATIONS:
                a = ops.glu(h, act)
                torch.autograd.grad(a.float().sum(), h)
    if dev == "cuda":
        torch.cuda.synchronize()


def bad_inputs_with_checks_off(dev):
    ops.set_cuda_checks(False)
    ids = torch.tensor([[0, 1], [7, 2**40], [-3, 1]], device=dev)
    plan = ops.routing_plan(ids, 8)
    ops.coactivation(ids, 8)
    x = torch.randn(3, 16, device=dev)
    ops.unpermute(ops.permute(x, plan), plan, torch.rand(3, 2, device=dev))
    row_of = torch.tensor([[0, 99], [-5, 1]], device=dev, dtype=torch.int32)
    bad = ops.RoutingPlan(plan.sorted_tokens[:4], row_of, plan.expert_offsets)
    ops.permute(x[:2], bad)
    y, w = torch.randn(4, 16, device=dev), torch.rand(2, 2, device=dev)
    ops.unpermute(y, bad, w)
    torch.ops.grouter.unpermute_backward(torch.randn(2, 16, device=dev), row_of, w, y)
    if dev == "cuda":
        torch.cuda.synchronize()


def coactivation_tiles(dev):
    ops.set_cuda_checks(True)
    sms = torch.cuda.get_device_properties(0).multi_processor_count if dev == "cuda" else 1
    for E, K in ((200, 8), (1024, 8)):
        # enough tokens that the tile pays (csrc/cuda/coactivation.cu): T*K*K > 2 * SMs * E*E
        T = 2 * sms * E * E // (K * K) + 1000 if E == 200 else 4000
        ops.coactivation(torch.rand(T, E, device=dev).topk(K, dim=1).indices, E)
    if dev == "cuda":
        torch.cuda.synchronize()


def expert_mlps(dev):
    for checks in (True, False):
        ops.set_cuda_checks(checks)
        for dtype, H, I in ((torch.bfloat16, 64, 32), (torch.float32, 24, 12), (torch.bfloat16, 20, 12)):
            counts = torch.tensor([30, 0, 17, 50])
            offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(dev)
            rows = torch.randn(int(counts.sum()), H, device=dev, dtype=dtype, requires_grad=True)
            gate_up = torch.randn(4, 2 * I, H, device=dev, dtype=dtype, requires_grad=True)
            down = torch.randn(4, H, I, device=dev, dtype=dtype, requires_grad=True)
            ops.expert_mlp(rows, offsets, gate_up, down, "silu").float().sum().backward()
    if dev == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for checks in (True, False):
            run(dtype, checks, device)
    if device == "cuda":  # the CPU kernels always check their input
        bad_inputs_with_checks_off(device)
    coactivation_tiles(device)
    expert_mlps(device)
    ops.set_cuda_checks(True)
    print("sanitize_ops: done")
