"""CUDA-only properties: agreement with the CPU kernels, determinism, streams, checks switched off.

The op tests parametrised over `device` already run every reference comparison on CUDA; these
add what only a GPU can show. Skipped where there is no GPU or grouter was built without CUDA.
"""

import os

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


@pytest.mark.parametrize("shifted", ["grad_out", "y", "both"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_weights_are_the_cpus_bits_at_every_alignment(dtype, shifted):
    # grad_w's dot products must not follow the vector width the rows allow (16-byte loads when
    # grad_out and y are both aligned, scalar ones otherwise): each combination against the CPU's
    # bits. A dot order that depended on the width would pass an aligned-vs-aligned comparison.
    T, K, E, H = 2000, 4, 16, 256  # rows of 16-byte multiples: the pointers alone pick the path
    ids = ref.random_routing(T, K, E)
    w, g, y = torch.rand(T, K), torch.randn(T, H).to(dtype), torch.randn(T * K, H).to(dtype)
    plan = ops.routing_plan(ids, E)
    want = torch.ops.grouter.unpermute_backward(g, plan.row_of, w, y)
    gc, yc = g.cuda(), y.cuda()
    if shifted in ("grad_out", "both"):
        gc = misaligned(gc)
    if shifted in ("y", "both"):
        yc = misaligned(yc)
    got = torch.ops.grouter.unpermute_backward(gc, ops.routing_plan(ids.cuda(), E).row_of, w.cuda(), yc)
    for a, b in zip(want, got):
        assert torch.equal(bits(a), bits(b.cpu()))


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


@pytest.mark.parametrize("dtype,shift,width", [(torch.float32, 0, 16), (torch.float32, 2, 8), (torch.float32, 1, 4),
                                               (torch.bfloat16, 1, 2), (torch.float64, 1, 8)])
def test_every_access_width_permutes_and_combines_exactly(dtype, shift, width):
    # Rows of 64 elements (a multiple of 16 bytes) whose start is `shift` elements past an aligned
    # address: the pointer alone decides the access (permute: 16/8/4/2 bytes; unpermute: 16 or
    # scalar). A [:, 1:] view would be copied by .contiguous() into an aligned buffer and test
    # nothing, so the rows are a contiguous view into a larger buffer.
    T, K, E, H = 300, 2, 8, 64
    ids = ref.random_routing(T, K, E).cuda()
    plan = ops.routing_plan(ids, E)

    def shifted(rows):
        buf = torch.randn(rows * H + shift, device="cuda").to(dtype)
        return buf[shift:].view(rows, H)

    x, y = shifted(T), shifted(T * K)
    w = torch.rand(T, K, device="cuda")
    for t in (x, y):
        assert t.is_contiguous() and (H * t.element_size()) % 16 == 0
        assert (t.data_ptr() % 16 or 16) == width  # the widest access this pointer allows
    assert torch.equal(ops.permute(x, plan), ref.permute(x, plan.row_of))
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


CANARY = 0xA5


def between_canaries(run, out_bytes):
    """(run()'s output, whether the 64 KiB on each side of it are untouched): run() must allocate
    one output of out_bytes, which the caching allocator puts in the hole left between two canary
    blocks of a private pool (best fit; asserted). A write past either end of the output lands in
    a canary, where memory errors inside one allocator segment would otherwise stay invisible."""
    if os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") == "1":
        pytest.skip("needs the caching allocator (compute-sanitizer memcheck covers this case without it)")
    pool = torch.cuda.MemPool()
    with torch.cuda.use_mem_pool(pool):
        before = torch.full((2**16,), CANARY, dtype=torch.uint8, device="cuda")
        hole = torch.empty(out_bytes, dtype=torch.uint8, device="cuda")
        after = torch.full((2**16,), CANARY, dtype=torch.uint8, device="cuda")
        where = hole.data_ptr()
        del hole
        out = run()
    torch.cuda.synchronize()
    assert out.data_ptr() == where and before.data_ptr() + before.numel() <= where < after.data_ptr(), \
        "the allocator did not place the output between the canaries: this test's set-up no longer holds"
    return out, bool((before == CANARY).all()) and bool((after == CANARY).all())


def test_checks_off_corrupt_plan_stays_in_bounds(checks_off):
    # A plan whose rows point outside [0, T*K) (99, -5): with checks off the kernels skip those
    # slots. Without the guard, permute and unpermute's backward would write x's row 99 rows past
    # their output (into a canary) and unpermute would read y's row 99 (NaN here: it is inside
    # y's larger buffer) into token 0.
    plan = ops.routing_plan(torch.tensor([[0, 1], [2, 3]], device="cuda"), 4)
    row_of = torch.tensor([[0, 99], [-5, 1]], device="cuda", dtype=torch.int32)
    bad = ops.RoutingPlan(plan.sorted_tokens, row_of, plan.expert_offsets)
    H = 8
    x = torch.randn(2, H, device="cuda")
    permuted, untouched = between_canaries(lambda: ops.permute(x, bad), 4 * H * 4)
    assert untouched, "permute wrote outside its output"
    assert torch.equal(permuted[0], x[0]) and torch.equal(permuted[1], x[1])
    buffer = torch.full((200, H), float("nan"), device="cuda")
    buffer[:4] = torch.randn(4, H, device="cuda")
    y, w = buffer[:4], torch.rand(2, 2, device="cuda")
    out = ops.unpermute(y, bad, w)
    assert torch.equal(out, torch.stack([w[0, 0] * y[0], w[1, 1] * y[1]]))  # invalid slots add nothing
    g = torch.randn(2, H, device="cuda")
    # Without y no grad_w is made: grad_y is the one allocation, the one the canaries surround.
    grad_y, untouched = between_canaries(lambda: torch.ops.grouter.unpermute_backward(g, row_of, w, None)[0], 4 * H * 4)
    assert untouched, "unpermute_backward wrote outside grad_y"
    assert torch.equal(grad_y[0], w[0, 0] * g[0]) and torch.equal(grad_y[1], w[1, 1] * g[1])


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


def test_expert_mlp_replays_in_a_cuda_graph(checks_off):
    # The bf16 grouped_mm kernel with checks off reads the offsets on the device only (no host
    # copy), so forward and backward capture; replayed on new rows, equal to running eagerly.
    N, E, H, I = 1024, 8, 64, 32
    counts = torch.tensor([200, 0, 150, 174, 0, 300, 100, 100])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).cuda()
    rows = torch.randn(N, H, device="cuda", dtype=torch.bfloat16)
    grad_out = torch.randn(N, H, device="cuda", dtype=torch.bfloat16)
    gate_up = (torch.randn(E, 2 * I, H, device="cuda") / H**0.5).bfloat16()
    down = (torch.randn(E, H, I, device="cuda") / I**0.5).bfloat16()

    def run():
        out, h = torch.ops.grouter.expert_mlp(rows, offsets, gate_up, down, "silu")
        return [out, h, *torch.ops.grouter.expert_mlp_backward(grad_out, rows, h, offsets, gate_up, down, "silu")]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    rows.copy_(torch.randn_like(rows))
    graph.replay()
    torch.cuda.synchronize()
    for i, (a, b) in enumerate(zip(captured, run())):
        assert torch.equal(a, b), f"output {i}"


def test_permute_and_unpermute_beyond_2_31_elements():
    # T*K*H > 2^31 in scalar accesses (rows 2 bytes past an aligned address): element offsets past
    # 2^31 that 32-bit index math would wrap (16-byte vectors stay below 2^28 and would not show
    # it). Checked on rows drawn from those whose elements lie past 2^31, the last row included.
    if torch.cuda.mem_get_info()[0] < 40 * 2**30:
        pytest.skip("needs 40 GB of free GPU memory")
    T, K, E, H = 2**18, 8, 64, 1040
    N = T * K
    first_high = 2**31 // H + 1  # rows from here on start past element 2^31
    assert N * H > 2**31 and first_high < N
    ids = ref.random_routing(T, K, E).cuda()
    plan = ops.routing_plan(ids, E)
    x = misaligned(torch.randn(T, H, device="cuda", dtype=torch.bfloat16))
    permuted = ops.permute(x, plan)
    rows = torch.cat([torch.randint(first_high, N, (4000,), device="cuda"), torch.tensor([N - 1], device="cuda")])
    assert torch.equal(permuted[rows], x[plan.sorted_tokens[rows].long()])
    y = misaligned(permuted)
    del permuted
    w = torch.rand(T, K, device="cuda")
    out = ops.unpermute(y, plan, w)
    tokens = torch.unique(plan.sorted_tokens[rows[:60]].long()).tolist()  # tokens with a row past 2^31
    for t in tokens:
        acc = torch.zeros(H, device="cuda")
        for k in range(K):
            acc = acc + w[t, k] * y[plan.row_of[t, k].long()].float()  # the kernel's order: k by k, in fp32
        assert torch.equal(out[t], acc.to(torch.bfloat16))


def test_coactivation_from_two_host_threads():
    # Two threads whose tiles both need the opt-in shared memory limit (E=120: 57.6 KB, E=200:
    # 160 KB, both over the 48 KB default): the attribute is per function and device-wide, so a
    # launch that set only its own size could let the other thread's larger launch fail.
    import threading

    props = torch.cuda.get_device_properties(0)
    optin = getattr(props, "shared_memory_per_block_optin", 0)
    cases = [(ref.random_routing(100000, 8, 120).cuda(), 120), (ref.random_routing(200000, 8, 200).cuda(), 200)]
    for ids, E in cases:  # the conditions of csrc/cuda/coactivation.cu's shared tile, so the case is the one meant
        tile = E * E * 4
        assert 48 * 1024 < tile <= optin, (E, tile, optin)
        assert 2 * props.multi_processor_count * E * E < ids.shape[0] * 8 * 8
    wants = [ref.coactivation(ids, E) for ids, E in cases]
    errors = []

    def work(ids, E, want):
        try:
            for _ in range(50):
                assert torch.equal(ops.coactivation(ids, E), want)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(*case, want)) for case, want in zip(cases, wants)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
