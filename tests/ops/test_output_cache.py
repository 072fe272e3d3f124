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


def test_emptying_the_cache_returns_memory_to_the_system():
    # In a fresh process: RSS after emptying the cache falls back by (about) what the cache held.
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import re, torch
        from grouter import ops

        def rss():
            return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) << 10

        ops.set_cpu_output_cache_limit(1 << 30)
        ids = torch.rand(2048, 8).argsort(1)[:, :2].contiguous()
        plan = ops.routing_plan(ids, 8)
        x = torch.randn(8000, 1024)
        del x  # a freed ~32 MiB mapping raises glibc's mmap threshold: later blocks come from its heap
        outs = [ops.permute(torch.randn(2048, 1024), plan) for _ in range(24)]  # 24 x 16 MiB
        del outs
        held, before = ops.cpu_output_cache_bytes(), rss()
        ops.empty_cpu_output_cache()
        print(held, before - rss())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    held, released = int(out[0]), int(out[1])
    assert held >= 24 * (16 << 20) and released > 0.9 * held, (held, released)


def test_cached_outputs_resize_like_any_tensor():
    T, K, E, H = 2048, 2, 8, 512  # 8 MiB: from the cache
    plan = ops.routing_plan(ref.random_routing(T, K, E), E)
    x = torch.randn(T, H)
    out = ops.permute(x, plan)
    expected = ref.permute(x, plan.row_of)
    out.resize_(2 * T * K, H)  # grows into a new block, keeping the data
    assert out.shape == (2 * T * K, H) and torch.equal(out[: T * K], expected)
    out[T * K:] = 1.0  # the new rows are real memory
    out.resize_(10, H)
    assert torch.equal(out, expected[:10])
