"""The CPU output cache recycles large op outputs without changing any result."""

import pytest
import torch

import reference as ref
from grouter import ops


@pytest.fixture
def cache_limit():
    limit = ops.cpu_output_cache_limit()
    yield
    ops.set_cpu_output_cache_limit(limit)


def test_recycled_outputs_are_fully_rewritten(cache_limit):
    ops.set_cpu_output_cache_limit(256 << 20)
    T, K, E, H = 2048, 2, 8, 512  # 8 MiB outputs: cached
    plan = ops.routing_plan(ref.random_routing(T, K, E), E)
    for _ in range(3):
        x = torch.randn(T, H)
        out = ops.permute(x, plan)
        assert torch.equal(out, ref.permute(x, plan.row_of))
        w = torch.rand(T, K)
        assert torch.equal(ops.unpermute(out, plan, w), ref.unpermute(out, plan.row_of, w))
        del out
    assert ops.cpu_output_cache_bytes() > 0


def test_limit_zero_disables_and_empty_releases(cache_limit):
    plan = ops.routing_plan(ref.random_routing(1024, 4, 16), 16)
    ops.set_cpu_output_cache_limit(64 << 20)
    del_me = ops.permute(torch.randn(1024, 1024), plan)
    del del_me
    assert ops.cpu_output_cache_bytes() >= 16 << 20
    ops.empty_cpu_output_cache()
    assert ops.cpu_output_cache_bytes() == 0
    ops.set_cpu_output_cache_limit(0)
    out = ops.permute(torch.randn(1024, 1024), plan)
    del out
    assert ops.cpu_output_cache_bytes() == 0


def test_cached_output_behaves_like_a_tensor(cache_limit):
    ops.set_cpu_output_cache_limit(64 << 20)
    plan = ops.routing_plan(ref.random_routing(1024, 2, 8), 8)
    x = torch.randn(1024, 1024, requires_grad=True)
    out = ops.permute(x, plan)
    (out * 2).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 4.0))
    assert out.detach().numpy().shape == (2048, 1024)
    assert torch.equal(out.clone(), out)
