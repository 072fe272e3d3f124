"""Every grouter op once on small CUDA inputs, for compute-sanitizer (memcheck, racecheck).

    compute-sanitizer --tool memcheck python bench/sanitize_ops.py   (python bench/sanitize_ops.py cpu:
    only to check the script)

Forward and backward of each op in fp32 and bf16, with checks on and off, an empty input, a
misaligned row view; synchronizes at the end so any fault surfaces before exit.
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
        flat = torch.randn(T * K * H + 1, device=dev, dtype=dtype)[1:].view(T * K, H)  # misaligned rows
        ops.unpermute(flat, plan, w.detach())
        torch.ops.grouter.unpermute_backward(flat[:T], plan.row_of, w.detach(), flat)  # misaligned grad_w rows
        h = torch.randn(T * K, 2 * H, device=dev, dtype=dtype, requires_grad=True)
        for act in ops.GLU_ACTIVATIONS:
            a = ops.glu(h, act)
            torch.autograd.grad(a.float().sum(), h)
    if dev == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    for dtype in (torch.float32, torch.bfloat16):
        for checks in (True, False):
            run(dtype, checks, device)
    ops.set_cuda_checks(True)
    print("sanitize_ops: done")
