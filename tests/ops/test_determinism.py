"""Bitwise reproducibility: the same inputs give the same bits for any thread count, every run."""

import pytest
import torch

import reference as ref
from grouter import ops


def bits(t):
    return t.detach().contiguous().view(torch.uint8) if t.is_floating_point() else t


def run_all(ids, x, y, w, g, E):
    plan = ops.routing_plan(ids, E)
    xr = x.clone().requires_grad_(True)
    yr = y.clone().requires_grad_(True)
    wr = w.clone().requires_grad_(True)
    permuted = ops.permute(xr, plan)
    combined = ops.unpermute(yr, plan, wr)
    permuted.backward(torch.ones_like(permuted))
    combined.backward(g)
    return [*plan, ops.coactivation(ids, E), permuted, combined, xr.grad, yr.grad, wr.grad]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_same_bits_for_1_and_2_threads(dtype):
    T, K, E, H = 6000, 4, 64, 96
    ids = ref.random_routing(T, K, E)
    x = torch.randn(T, H).to(dtype)
    y = torch.randn(T * K, H).to(dtype)
    w = torch.rand(T, K)
    g = torch.randn(T, H).to(dtype)
    before = torch.get_num_threads()
    try:
        results = {}
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            results.setdefault(n, []).append(run_all(ids, x, y, w, g, E))
    finally:
        torch.set_num_threads(before)
    runs = results[1] + results[2]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(bits(a), bits(b))
