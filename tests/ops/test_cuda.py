"""CUDA-only properties: agreement with the CPU kernels, determinism, streams, checks switched off.

The op tests parametrised over `device` already run every reference comparison on CUDA; these
add what only a GPU can show. Skipped where there is no GPU or grouter was built without CUDA.
"""

import pytest
import torch

import reference as ref
from devices import HAS_CUDA
from grouter import ops

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and grouter's CUDA kernels")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def all_outputs(ids, x, y, w, g, E):
    plan = ops.routing_plan(ids, E)
    xr, yr, wr = (t.clone().requires_grad_(True) for t in (x, y, w))
    permuted = ops.permute(xr, plan)
    combined = ops.unpermute(yr, plan, wr)
    permuted.backward(torch.ones_like(permuted))
    combined.backward(g)
    return [*plan, ops.coactivation(ids, E), permuted, combined, xr.grad, yr.grad, wr.grad]


def inputs(T, K, E, H, dtype, device):
    ids = ref.random_routing(T, K, E).to(device)
    return (ids, torch.randn(T, H).to(dtype).to(device), torch.randn(T * K, H).to(dtype).to(device),
            torch.rand(T, K).to(device), torch.randn(T, H).to(dtype).to(device))


@pytest.mark.parametrize("dtype", DTYPES)
def test_bitwise_reproducible(dtype):
    args = inputs(5000, 8, 128, 200, dtype, "cuda")
    first = all_outputs(*args, 128)
    second = all_outputs(*args, 128)
    for a, b in zip(first, second):
        assert torch.equal(a.view(torch.uint8) if a.is_floating_point() else a,
                           b.view(torch.uint8) if b.is_floating_point() else b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_cpu_kernels(dtype):
    # Same fp32 sums in the same k order on both devices: forward results agree to the bit.
    args = inputs(3000, 4, 32, 136, dtype, "cpu")
    cpu = all_outputs(*args, 32)
    gpu = all_outputs(*(a.cuda() for a in args), 32)
    for i, (a, b) in enumerate(zip(cpu, gpu)):
        if i == len(cpu) - 1:  # grad_weights: dot products reduced in another order
            torch.testing.assert_close(b.cpu(), a, rtol=1e-2, atol=1e-2)
        else:
            assert torch.equal(a, b.cpu()), f"output {i}"


def test_misaligned_rows_take_the_scalar_path():
    ids = ref.random_routing(300, 2, 8).cuda()
    plan = ops.routing_plan(ids, 8)
    # Contiguous tensors one float past an aligned address (a [:, 1:] view would be copied by the
    # op's .contiguous() into an aligned buffer, testing nothing).
    x = torch.randn(300 * 37 + 1, device="cuda")[1:].view(300, 37)
    assert x.is_contiguous() and x.data_ptr() % 16 != 0
    assert torch.equal(ops.permute(x, plan), ref.permute(x, plan.row_of))
    y = torch.randn(600 * 37 + 1, device="cuda")[1:].view(600, 37)
    w = torch.rand(300, 2, device="cuda")
    assert y.is_contiguous() and y.data_ptr() % 16 != 0
    assert torch.equal(ops.unpermute(y, plan, w), ref.unpermute(y, plan.row_of, w))


def test_side_stream():
    ids, x, y, w, g = inputs(2000, 2, 16, 64, torch.float32, "cuda")
    expected = all_outputs(ids, x, y, w, g, 16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = all_outputs(ids, x, y, w, g, 16)
    torch.cuda.current_stream().wait_stream(stream)
    for a, b in zip(expected, got):
        assert torch.equal(a, b)


def test_large_e_coactivation_uses_global_counters():
    ids = ref.random_routing(4000, 8, 1024).cuda()  # a 1024 x 1024 tile does not fit in shared memory
    assert torch.equal(ops.coactivation(ids, 1024), ref.coactivation(ids, 1024))


@pytest.fixture
def checks_off():
    ops.set_cuda_checks(False)
    yield
    ops.set_cuda_checks(True)


def test_checks_off_bad_ids_stay_in_bounds(checks_off):
    ids = torch.tensor([[0, 1], [7, 2**40], [-3, 1]], device="cuda")
    plan = ops.routing_plan(ids, 8)
    C = ops.coactivation(ids, 8)
    x = torch.randn(3, 16, device="cuda")
    out = ops.unpermute(ops.permute(x, plan), plan)
    torch.cuda.synchronize()  # an out-of-bounds access would surface here as a CUDA error
    assert plan.expert_offsets[-1].item() == 4  # two invalid slots sorted past the last expert
    assert C.sum().item() == 4 + 1 + 1  # valid ids only: token 0's four pairs, (7,7), (1,1)
    assert out.shape == (3, 16)


def test_checks_off_corrupt_plan_stays_in_bounds(checks_off):
    plan = ops.routing_plan(torch.tensor([[0, 1], [2, 3]], device="cuda"), 4)
    bad = ops.RoutingPlan(plan.sorted_tokens, torch.tensor([[0, 99], [-5, 1]], device="cuda", dtype=torch.int32),
                          plan.expert_offsets)
    x = torch.randn(2, 8, device="cuda")
    ops.permute(x, bad)
    ops.unpermute(torch.randn(4, 8, device="cuda"), bad, torch.rand(2, 2, device="cuda"))
    torch.cuda.synchronize()


@pytest.mark.parametrize("dtype,w", [(torch.bfloat16, 1 + 2**-8 + 2**-40), (torch.float16, 1 + 2**-11 + 2**-40)])
def test_fp64_weights_round_twice_like_torch(dtype, w):
    # fp64 accumulation rounded to a 16-bit type goes through float (double -> float -> half), as
    # torch and the CPU kernel do; rounding once gives 1 + 2^-7 (bf16) or 1 + 2^-10 (fp16) here.
    plan = ops.routing_plan(torch.zeros(1, 1, dtype=torch.long, device="cuda"), 1)
    y = torch.ones(1, 1, dtype=dtype, device="cuda")
    weights = torch.tensor([[w]], dtype=torch.float64, device="cuda")
    out = ops.unpermute(y, plan, weights)
    assert out.item() == 1.0 == ops.unpermute(y.cpu(), ops.routing_plan(torch.zeros(1, 1, dtype=torch.long), 1),
                                              weights.cpu()).item()
    grad_y, _ = torch.ops.grouter.unpermute_backward(torch.ones(1, 1, dtype=dtype, device="cuda"), plan.row_of,
                                                      weights, None)
    assert grad_y.item() == 1.0  # the backward's grad_y rounds the same way
