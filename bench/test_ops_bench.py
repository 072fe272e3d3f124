"""Op benchmarks: grouter vs the torch-native path vs a memcpy of the same bytes.

    python -m pytest bench -q

torch-native paths: argsort + index_select for permute; index_add_ for the weighted combine.
"memcpy" copies the permute's byte count into an existing buffer (pure bandwidth); "clone" copies
it into a fresh tensor, paying the page faults every op output pays on first touch.
"""

import pytest
import torch

from grouter import ops
from native import native_permute, native_unpermute

SHAPES = {  # name: (T, H, K, E, dtype)
    "T16384 H1024 K2 E16 fp32": (16384, 1024, 2, 16, torch.float32),
    "T8192 H2048 K8 E64 bf16": (8192, 2048, 8, 64, torch.bfloat16),
}


@pytest.fixture(scope="module", params=list(SHAPES))
def case(request):
    T, H, K, E, dtype = SHAPES[request.param]
    g = torch.Generator().manual_seed(0)
    ids = torch.rand(T, E, generator=g).topk(K, dim=1).indices
    x = torch.randn(T, H, generator=g).to(dtype)
    weights = torch.rand(T, K, generator=g)
    plan = ops.routing_plan(ids, E)
    y = ops.permute(x, plan)
    grad_out = torch.randn(T, H, generator=g).to(dtype)
    el = x.element_size()
    nbytes = {
        "ids": ids.numel() * ids.element_size(),
        "permute": T * H * el + T * K * H * el,  # read x, write K rows per token
        "unpermute": T * K * H * el + T * H * el + weights.numel() * 4,
        "unpermute backward": (T * H + 2 * T * K * H) * el + 2 * weights.numel() * 4,
    }
    return dict(name=request.param, T=T, H=H, K=K, E=E, ids=ids, x=x, w=weights, plan=plan, y=y,
                g=grad_out, bytes=nbytes)


def test_memcpy(benchmark, record, case):
    n = case["bytes"]["permute"] // 2 // case["x"].element_size()
    src = torch.randn(n).to(case["x"].dtype)
    dst = torch.empty_like(src)
    benchmark(dst.copy_, src)
    record(case["name"], "memcpy", case["bytes"]["permute"])


def test_clone(benchmark, record, case):
    src = torch.randn(case["bytes"]["permute"] // 2 // case["x"].element_size()).to(case["x"].dtype)
    benchmark(src.clone)
    record(case["name"], "clone (fresh output)", case["bytes"]["permute"])


def test_routing_plan(benchmark, record, case):
    benchmark(ops.routing_plan, case["ids"], case["E"])
    record(case["name"], "routing_plan", 0)


def test_permute_with_plan(benchmark, record, case):
    ids, E, x = case["ids"], case["E"], case["x"]
    benchmark(lambda: ops.permute(x, ops.routing_plan(ids, E)))
    record(case["name"], "permute+plan", case["bytes"]["permute"] + case["bytes"]["ids"])


def test_native_permute(benchmark, record, case):
    benchmark(native_permute, case["ids"], case["x"], case["K"])
    record(case["name"], "native permute", case["bytes"]["permute"] + case["bytes"]["ids"])


def test_unpermute(benchmark, record, case):
    benchmark(ops.unpermute, case["y"], case["plan"], case["w"])
    record(case["name"], "unpermute", case["bytes"]["unpermute"])


def test_native_unpermute(benchmark, record, case):
    benchmark(native_unpermute, case["ids"], case["y"], case["w"], case["K"])
    record(case["name"], "native unpermute", case["bytes"]["unpermute"])


def test_unpermute_backward(benchmark, record, case):
    op = torch.ops.grouter.unpermute_backward
    benchmark(op, case["g"], case["plan"].row_of, case["w"], case["y"])
    record(case["name"], "unpermute backward", case["bytes"]["unpermute backward"])


def test_permute_backward(benchmark, record, case):
    benchmark(ops.unpermute, case["y"], case["plan"], None)
    record(case["name"], "permute backward", case["bytes"]["unpermute"] - case["w"].numel() * 4)


@pytest.fixture
def no_output_cache():
    limit = ops.cpu_output_cache_limit()
    ops.set_cpu_output_cache_limit(0)
    yield
    ops.set_cpu_output_cache_limit(limit)


def test_permute_cold(benchmark, record, case, no_output_cache):
    # Every output freshly allocated and faulted in, as on a first call.
    benchmark(ops.permute, case["x"], case["plan"])
    record(case["name"], "permute (cache off)", case["bytes"]["permute"])


def test_unpermute_cold(benchmark, record, case, no_output_cache):
    benchmark(ops.unpermute, case["y"], case["plan"], case["w"])
    record(case["name"], "unpermute (cache off)", case["bytes"]["unpermute"])
