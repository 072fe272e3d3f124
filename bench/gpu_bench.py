"""Times every grouter op on a GPU against the torch-native path and a device-to-device copy.

    python bench/gpu_bench.py [--out DIR] [--device cpu --quick]   (cpu: only to check the script)

Median of CUDA-event timings after warm-up, inputs rotated over several buffers so no call finds
its data in L2. GB/s counts the bytes an op must read plus write; "% copy" compares with
`dst.copy_(src)` of the same byte count, measured in the same run; "x native" is the speed-up over
the torch-native path (argsort + index_select / index_add_ / gather-multiply-sum).
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from grouter import ops
from native import native_permute, native_unpermute

SHAPES = {  # name: (T, H, K, E, dtype)
    "T16384 H4096 K8 E128 bf16": (16384, 4096, 8, 128, torch.bfloat16),
    "T4096 H2048 K2 E8 fp32": (4096, 2048, 2, 8, torch.float32),
}
QUICK_SHAPES = {"T512 H256 K4 E16 bf16": (512, 256, 4, 16, torch.bfloat16)}


def timer(device, warmup=5, reps=30):
    def measure(fn, args_list):
        for i in range(warmup):
            fn(*args_list[i % len(args_list)])
        times = []
        for i in range(reps):
            args = args_list[i % len(args_list)]
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(*args)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn(*args)
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return measure


def make_inputs(T, H, K, E, dtype, device, copies):
    out = []
    for _ in range(copies):
        ids = torch.rand(T, E, device=device).topk(K, dim=1).indices
        plan = ops.routing_plan(ids, E)
        x = torch.randn(T, H, device=device, dtype=dtype)
        out.append(dict(ids=ids, plan=plan, x=x, y=ops.permute(x, plan), w=torch.rand(T, K, device=device),
                        g=torch.randn(T, H, device=device, dtype=dtype)))
    return out


def native_unpermute_backward(ids, g, y, w, K):
    order = ids.reshape(-1).argsort(stable=True)
    rows = g.index_select(0, order // K)
    grad_y = rows * w.reshape(-1)[order, None].to(g.dtype)
    grad_w = torch.empty_like(w).view(-1)
    grad_w[order] = (rows.float() * y.float()).sum(-1)
    return grad_y, grad_w


def native_routing_plan(ids, E):
    flat = ids.reshape(-1)
    order = flat.argsort(stable=True)
    row_of = torch.empty_like(order)
    row_of[order] = torch.arange(order.numel(), device=ids.device)
    counts = torch.bincount(flat, minlength=E)
    return order // ids.shape[1], row_of, counts.cumsum(0)


def bench_shape(name, T, H, K, E, dtype, device, measure):
    copies = 2 if T * H * K * torch.finfo(dtype).bits // 8 > (512 << 20) else 4
    inputs = make_inputs(T, H, K, E, dtype, device, copies)
    el = torch.finfo(dtype).bits // 8
    b_permute = (T * H + T * K * H) * el
    b_unpermute = (T * K * H + T * H) * el + T * K * 4
    b_backward = (T * H + 2 * T * K * H) * el + 2 * T * K * 4
    n = b_permute // 2 // el
    src = [torch.empty(n, device=device, dtype=dtype) for _ in range(copies)]
    dst = [torch.empty(n, device=device, dtype=dtype) for _ in range(copies)]
    copy_s = measure(lambda s, d: d.copy_(s), list(zip(src, dst)))
    del src, dst
    copy_gbps = b_permute / copy_s / 1e9
    bwd = torch.ops.grouter.unpermute_backward
    cases = [
        ("permute", b_permute, lambda i: ops.permute(i["x"], i["plan"]),
         lambda i: native_permute(i["ids"], i["x"], K)),
        ("permute+plan", b_permute, lambda i: ops.permute(i["x"], ops.routing_plan(i["ids"], E)),
         lambda i: native_permute(i["ids"], i["x"], K)),
        ("unpermute", b_unpermute, lambda i: ops.unpermute(i["y"], i["plan"], i["w"]),
         lambda i: native_unpermute(i["ids"], i["y"], i["w"], K)),
        ("unpermute backward", b_backward, lambda i: bwd(i["g"], i["plan"].row_of, i["w"], i["y"]),
         lambda i: native_unpermute_backward(i["ids"], i["g"], i["y"], i["w"], K)),
        ("permute backward", b_unpermute - T * K * 4, lambda i: ops.unpermute(i["y"], i["plan"], None),
         None),
    ]
    rows = [dict(shape=name, op="d2d copy", us=copy_s * 1e6, gbps=copy_gbps, pct_copy=100.0, x_native=None)]
    for op, nbytes, ours, native in cases:
        s = measure(ours, [(i,) for i in inputs])
        ns = measure(native, [(i,) for i in inputs]) if native else None
        gbps = nbytes / s / 1e9
        rows.append(dict(shape=name, op=op, us=s * 1e6, gbps=gbps, pct_copy=100 * gbps / copy_gbps,
                         x_native=ns / s if ns else None))
    return rows


def bench_routing_plan(T, K, E, device, measure):
    ids = [torch.rand(T, E, device=device).topk(K, dim=1).indices for _ in range(4)]
    s = measure(lambda i: ops.routing_plan(i, E), [(i,) for i in ids])
    ns = measure(lambda i: native_routing_plan(i, E), [(i,) for i in ids])
    checked = ops.cuda_checks_enabled()
    return dict(shape=f"T{T} K{K} E{E}", op="routing_plan" + (" (checks on)" if checked else ""),
                us=s * 1e6, gbps=None, pct_copy=None, x_native=ns / s)


def bench_glu(N, I, dtype, device, measure):
    """grouter.ops.glu forward and backward vs torch's silu(gate) * up (and its autograd)."""
    import torch.nn.functional as F

    hs = [torch.randn(N, 2 * I, device=device, dtype=dtype) for _ in range(3)]
    gs = [torch.randn(N, I, device=device, dtype=dtype) for _ in range(3)]
    el = torch.finfo(dtype).bits // 8

    def native_fwd(h):
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up

    def native_bwd(h, g):
        h = h.detach().requires_grad_(True)
        return torch.autograd.grad(native_fwd(h), h, g)

    name = f"N{N} I{I} {str(dtype).split('.')[-1]}"
    rows = []
    for op, nbytes, ours, native, args in (
        ("glu (silu) fwd", 3 * N * I * el, lambda h: ops.glu(h, "silu"), native_fwd, [(h,) for h in hs]),
        ("glu (silu) bwd", 6 * N * I * el, lambda h, g: torch.ops.grouter.glu_backward(g, h, "silu"), native_bwd,
         list(zip(hs, gs))),
    ):
        t, tn = measure(ours, args), measure(native, args)
        rows.append(dict(shape=name, op=op, us=t * 1e6, gbps=nbytes / t / 1e9, pct_copy=None, x_native=tn / t))
    return rows


def bench_expert_mlp(T, H, I, K, E, dtype, device, measure):
    """grouter.ops.expert_mlp forward + backward vs grouped_mm with a separate silu(gate) * up."""
    import torch.nn.functional as F

    from grouter.ops import expert_mlp

    ids = torch.rand(T, E, device=device).topk(K, dim=1).indices
    plan = ops.routing_plan(ids, E)
    rows = torch.randn(T * K, H, device=device, dtype=dtype, requires_grad=True)
    w1 = (torch.randn(E, 2 * I, H, device=device, dtype=dtype) * 0.02).requires_grad_(True)
    w2 = (torch.randn(E, H, I, device=device, dtype=dtype) * 0.02).requires_grad_(True)
    offs = plan.expert_offsets[1:].to(torch.int32)
    grad_out = torch.randn(T * K, H, device=device, dtype=dtype)

    def ours():
        expert_mlp(rows, plan.expert_offsets, w1, w2, "silu").backward(grad_out)

    def native():
        h = F.grouped_mm(rows, w1.transpose(-2, -1), offs=offs)
        gate, up = h.chunk(2, dim=-1)
        F.grouped_mm(F.silu(gate) * up, w2.transpose(-2, -1), offs=offs).backward(grad_out)

    flops = 18 * T * K * H * I
    t = measure(ours, [()])
    tn = measure(native, [()]) if hasattr(F, "grouped_mm") else None
    return [dict(shape=f"T{T} H{H} I{I} K{K} E{E} {str(dtype).split('.')[-1]}", op="expert_mlp fwd+bwd (TFLOP/s)",
                 us=t * 1e6, gbps=flops / t / 1e12, pct_copy=None, x_native=tn / t if tn else None)]


def fmt(row):
    def num(v, f):
        return f"{v:{f}}" if v is not None else ""

    return (f"{row['shape']:28s} {row['op']:26s} {num(row['us'], '10.1f'):>10s} {num(row['gbps'], '8.0f'):>8s} "
            f"{num(row['pct_copy'], '7.0f'):>7s} {num(row['x_native'], '8.1f'):>8s}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="one small shape (checks the script)")
    parser.add_argument("--out", type=Path, help="folder for results.json")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no GPU: pass --device cpu --quick to check the script on a CPU")
    measure = timer(args.device)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    rows = []
    ops.set_cuda_checks(False)  # the hot path a training loop would run; checks cost one sync per op
    for name, (T, H, K, E, dtype) in shapes.items():
        rows += bench_shape(name, T, H, K, E, dtype, args.device, measure)
    T, K, E = (512, 4, 16) if args.quick else (16384, 8, 128)
    rows.append(bench_routing_plan(T, K, E, args.device, measure))
    ops.set_cuda_checks(True)
    rows.append(bench_routing_plan(T, K, E, args.device, measure))
    rows += bench_glu(*((512, 256) if args.quick else (131072, 1536)), torch.bfloat16, args.device, measure)
    mlp = (256, 128, 64, 2, 8) if args.quick else (16384, 2048, 768, 8, 128)
    rows += bench_expert_mlp(*mlp, torch.bfloat16, args.device, measure)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"# {device_name}, torch {torch.__version__}, median of CUDA-event timings")
    print(f"{'shape':28s} {'op':26s} {'us':>10s} {'GB/s':>8s} {'%copy':>7s} {'x native':>8s}")
    for row in rows:
        print(fmt(row))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(dict(device=device_name, rows=rows), indent=1))


if __name__ == "__main__":
    main()
