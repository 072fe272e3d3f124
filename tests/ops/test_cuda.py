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
    xr, yr, wr = (t.detach().requires_grad_(True) for t in (x, y, w))  # same storage: alignment kept
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


def misaligned(t):
    """The same values in a contiguous tensor one element past an aligned address (2 bytes for
    bf16/fp16): rows that cannot take the 16-byte vector path."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    assert out.is_contiguous() and out.data_ptr() % 16 != 0
    return out


def bits(t):
    return t.view(torch.uint8) if t.is_floating_point() else t


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_output_and_gradient_matches_the_cpu_kernels_bitwise(dtype, aligned):
    # Same sums in the same order on both devices (the combine in k order, grad_weights in the
    # CPU's 16 dot lanes and halving tree): every output and gradient agrees to the bit, whatever
    # the rows' alignment. H = 136 is not a multiple of 16 lanes or of a 16-byte vector of fp64.
    args = inputs(3000, 4, 32, 136, dtype, "cpu")
    cpu = all_outputs(*args, 32)
    gpu_args = [a.cuda() for a in args]
    if not aligned:
        gpu_args = [gpu_args[0], *(misaligned(a) if a.is_floating_point() else a for a in gpu_args[1:])]
    gpu = all_outputs(*gpu_args, 32)
    for i, (a, b) in enumerate(zip(cpu, gpu)):
        assert torch.equal(bits(a), bits(b.cpu())), f"output {i}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_weights_do_not_depend_on_alignment(dtype):
    ids, x, y, w, g = inputs(2000, 4, 16, 256, dtype, "cuda")
    aligned = all_outputs(ids, x, y, w, g, 16)
    shifted = all_outputs(ids, misaligned(x), misaligned(y), w, misaligned(g), 16)
    for a, b in zip(aligned, shifted):
        assert torch.equal(bits(a), bits(b))


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_glu_matches_the_cpu_kernel_bitwise(activation, dtype):
    # The same IEEE operations on both (explicit fused multiply-adds, nothing contracted).
    h = (torch.randn(3000, 2 * 136) * 3).to(dtype)
    grad_a = torch.randn(3000, 136).to(dtype)
    cpu = [ops.glu(h, activation), *torch.ops.grouter.glu_backward(grad_a, h, activation)]
    gpu = [ops.glu(h.cuda(), activation), *torch.ops.grouter.glu_backward(grad_a.cuda(), h.cuda(), activation)]
    for a, b in zip(cpu, gpu):
        assert torch.equal(bits(a), bits(b.cpu()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_misaligned_half_rows_by_two_bytes(dtype):
    ids = ref.random_routing(300, 2, 8).cuda()
    plan = ops.routing_plan(ids, 8)
    x = misaligned(torch.randn(300, 64, device="cuda").to(dtype))
    y = misaligned(torch.randn(600, 64, device="cuda").to(dtype))
    w = torch.rand(300, 2, device="cuda")
    g = misaligned(torch.randn(300, 64, device="cuda").to(dtype))
    assert x.data_ptr() % 4 == 2
    assert torch.equal(ops.permute(x, plan), ref.permute(x, plan.row_of))
    assert torch.equal(ops.unpermute(y, plan, w), ref.unpermute(y, plan.row_of, w))
    grad_y, grad_w = torch.ops.grouter.unpermute_backward(g, plan.row_of, w, y)
    want_y, want_w = ref.unpermute_backward(g, plan.row_of, w, y)
    assert torch.equal(grad_y, want_y)
    torch.testing.assert_close(grad_w, want_w)


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


def test_every_op_replays_in_a_cuda_graph(checks_off):
    # With checks off no op may synchronise or use the legacy stream: captured once, replayed on
    # new inputs written into the captured tensors, equal to running the ops eagerly.
    T, K, E, H = 512, 2, 16, 64
    ids, x, y, w, g = inputs(T, K, E, H, torch.float32, "cuda")
    h = torch.randn(T, 2 * H, device="cuda")
    grad_a = torch.randn(T, H, device="cuda")

    def run():
        plan = ops.routing_plan(ids, E)
        permuted = torch.ops.grouter.permute(x, plan.row_of)
        combined = torch.ops.grouter.unpermute(y, plan.row_of, w)
        backward = torch.ops.grouter.unpermute_backward(g, plan.row_of, w, y)
        return [*plan, permuted, combined, *backward, torch.ops.grouter.coactivation(ids, E),
                torch.ops.grouter.glu(h, "silu"), *torch.ops.grouter.glu_backward(grad_a, h, "silu")]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (CUB, allocator)
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    new = inputs(T, K, E, H, torch.float32, "cuda")
    for old, fresh in zip((ids, x, y, w, g), new):
        old.copy_(fresh)
    h.copy_(torch.randn_like(h))
    graph.replay()
    torch.cuda.synchronize()
    for i, (a, b) in enumerate(zip(captured, run())):
        assert torch.equal(a, b), f"output {i}"


def test_permute_and_unpermute_beyond_2_31_elements():
    # T*K*H > 2^31: every row offset needs 64-bit index math. Spot-checked rows.
    if torch.cuda.mem_get_info()[0] < 40 * 2**30:
        pytest.skip("needs 40 GB of free GPU memory")
    T, K, E, H = 2**18, 8, 64, 1040
    assert T * K * H > 2**31
    ids = ref.random_routing(T, K, E).cuda()
    plan = ops.routing_plan(ids, E)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    permuted = ops.permute(x, plan)
    tokens = torch.randint(0, T, (2000,), device="cuda")
    ks = torch.randint(0, K, (2000,), device="cuda")
    assert torch.equal(permuted[plan.row_of[tokens, ks].long()], x[tokens])
    last = plan.row_of[T - 1].long()  # the last row of each of its experts (the highest: past 2^31)
    assert torch.equal(permuted[last], x[T - 1].expand(K, H))
    assert torch.equal(permuted[-1], x[plan.sorted_tokens[-1].long()])
    w = torch.rand(T, K, device="cuda")
    out = ops.unpermute(permuted, plan, w)
    for t in tokens[:50].tolist() + [T - 1]:
        acc = torch.zeros(H, device="cuda")
        for k in range(K):
            acc = acc + w[t, k] * x[t].float()  # the kernel's order: k by k, in fp32
        assert torch.equal(out[t], acc.to(torch.bfloat16))


def test_coactivation_from_two_host_threads():
    # Two threads, one with a small shared tile and one whose tile needs the opt-in shared memory
    # limit: neither may fail the other's launch (the attribute is per function, device-wide).
    import threading

    cases = [(ref.random_routing(20000, 4, 32).cuda(), 32), (ref.random_routing(200000, 8, 200).cuda(), 200)]
    wants = [ref.coactivation(ids, E) for ids, E in cases]
    errors = []

    def work(ids, E, want):
        try:
            for _ in range(20):
                assert torch.equal(ops.coactivation(ids, E), want)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(*case, want)) for case, want in zip(cases, wants)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
