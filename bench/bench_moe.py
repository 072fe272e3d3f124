"""MoE layer benchmarks, forward + backward, on the CPU (or --device cuda).

    python bench/bench_moe.py [--tokens 8192] [--reps 10]

1. transformers' OlmoeSparseMoeBlock (H=512, I=256, E=16, K=2, fp32) with its experts run by
   `eager`, `grouped_mm` and `grouter`, on the same weights and inputs; and its experts module
   alone (`eager`, `grouter`) on fixed routes, as an attached Grouter runs it (no learned gate).
2. grouter.nn.MoE on the same experts: fixed routing (a prepared Routing, as a Grouter gives)
   vs a learned softmax router + aux loss.

Times are medians of --reps runs after warm-up, all cases interleaved. "floor" is the expert
GEMMs any implementation must run, forward and backward (six per expert: gate_up, down, and the
input and weight gradients of both), timed with torch.mm at the same per-expert shapes in the same
run; "% floor" says how close a layer gets to doing nothing but its matmuls. The header also gives
the rate of one reference GEMM ([4096 x 512] @ [512 x 512]) and the floor it would imply.
"""

import argparse
import copy
import statistics
import time

import torch

import grouter.hf  # noqa: F401  (registers the "grouter" experts implementation)
from grouter import nn as gnn


def median_time(fn, reps, warmup=2, device="cpu"):
    return median_times({"": fn}, reps, warmup, device)[""]


def median_times(fns, reps, warmup=2, device="cpu"):
    """Median seconds of each function, the calls interleaved round-robin so that the machine's
    slow and fast spells fall on all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def gemm_rate(device, reps, dtype=torch.float32):
    a, b = torch.randn(4096, 512, device=device, dtype=dtype), torch.randn(512, 512, device=device, dtype=dtype)
    return 2 * 4096 * 512 * 512 / median_time(lambda: a @ b, reps * 5, device=device)


def olmoe_blocks(H, I, E, K, device, dtype=torch.float32):
    from transformers import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

    config = OlmoeConfig(hidden_size=H, intermediate_size=I, num_experts=E, num_experts_per_tok=K)
    torch.manual_seed(0)
    block = OlmoeSparseMoeBlock(config).to(device=device, dtype=dtype)
    with torch.no_grad():
        block.gate.weight.normal_(std=0.02)
        block.experts.gate_up_proj.normal_(std=0.02)
        block.experts.down_proj.normal_(std=0.02)
    blocks = {}
    for impl in ("eager", "grouped_mm", "grouter"):
        b = copy.deepcopy(block)
        b.experts.config._experts_implementation_internal = impl
        blocks[impl] = b
    return blocks


class RoutedExperts(torch.nn.Module):
    """A transformers experts module called with fixed routes, as under an attached Grouter: the
    experts implementation alone, without the block's learned gate."""

    def __init__(self, experts, ids, weights):
        super().__init__()
        self.experts, self.ids, self.weights = experts, ids, weights

    def forward(self, x):
        return self.experts(x.view(-1, x.shape[-1]), self.ids, self.weights)


def expert_gemm_floor(counts, H, I, device, dtype):
    """The six torch.mm per expert of a forward + backward at the routed row counts."""
    mats = []
    for n in counts:
        if n == 0:
            continue
        r = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
        mats.append(dict(x=r(n, H), w1=r(2 * I, H), w2=r(H, I), a=r(n, I), go=r(n, H), gh=r(n, 2 * I)))

    def step():
        for m in mats:
            torch.mm(m["x"], m["w1"].t())  # h = x @ gate_up^T
            torch.mm(m["a"], m["w2"].t())  # out = a @ down^T
            torch.mm(m["go"], m["w2"])  # grad_a
            torch.mm(m["go"].t(), m["a"])  # grad_down
            torch.mm(m["gh"].t(), m["x"])  # grad_gate_up
            torch.mm(m["gh"], m["w1"])  # grad_x

    return step


def fwd_bwd(module, x, **kwargs):
    """One forward + backward of the layer alone: the output's gradient is a fixed random tensor
    (no loss computed), plus the router's aux loss where there is one."""
    grad = []

    def step():
        for p in module.parameters():
            p.grad = None
        x.grad = None
        out = module(x, **kwargs)
        if not grad:
            grad.append(torch.randn_like(out))
        outputs, grads = [out], [grad[0]]
        aux = getattr(module, "aux_loss", None)
        if aux is not None:
            outputs.append(0.01 * aux)
            grads.append(torch.ones_like(aux))
        torch.autograd.backward(outputs, grads)

    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="parameters and activations (the floor is measured in the same dtype)")
    args = parser.parse_args()
    T, H, I, E, K, dev = args.tokens, 512, 256, 16, 2, args.device
    dtype = getattr(torch, args.dtype)

    rate = gemm_rate(dev, args.reps, dtype)
    rate_floor = 18 * T * K * H * I / rate  # fwd 6*TK*H*I, bwd twice that

    x = torch.randn(1, T, H, device=dev, dtype=dtype, requires_grad=True)
    blocks = olmoe_blocks(H, I, E, K, dev, dtype)
    cases = {f"OlmoeSparseMoeBlock experts={impl}": fwd_bwd(b, x) for impl, b in blocks.items()}
    torch.manual_seed(0)
    learned = gnn.MoE(H, I, E, K, router="softmax").to(device=dev, dtype=dtype)
    fixed = gnn.MoE(H, I, E, K).to(device=dev, dtype=dtype)
    fixed.experts.load_state_dict(learned.experts.state_dict())
    with torch.no_grad():
        ids, w = learned.router(x.view(T, H))
    routing = gnn.Routing.prepare(ids, w, E)  # built once, as a Grouter's routes are per step
    for impl in ("eager", "grouter"):
        cases[f"Olmoe experts={impl}, fixed routes"] = fwd_bwd(RoutedExperts(blocks[impl].experts, ids, w), x)
    cases["grouter.nn.MoE learned softmax + aux loss"] = fwd_bwd(learned, x)
    cases["grouter.nn.MoE fixed routing"] = fwd_bwd(fixed, x, routing=routing)
    counts = routing.plan.expert_offsets.diff().tolist()
    cases["floor: per-expert torch.mm"] = expert_gemm_floor(counts, H, I, dev, dtype)
    times = median_times(cases, args.reps, device=dev)
    floor = times.pop("floor: per-expert torch.mm")
    print(f"# {T} tokens, H={H} I={I} E={E} K={K} {args.dtype}, {dev}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; floor (per-expert torch.mm, same run) {floor * 1e3:.1f} ms; "
          f"reference GEMM {rate / 1e9:.0f} GFLOP/s (floor at that rate {rate_floor * 1e3:.0f} ms)")
    eager = times["OlmoeSparseMoeBlock experts=eager"]
    rows = [(name, t, eager / t) for name, t in times.items()]
    t_grouter = times["OlmoeSparseMoeBlock experts=grouter"]
    t_learned, t_fixed = times["grouter.nn.MoE learned softmax + aux loss"], times["grouter.nn.MoE fixed routing"]

    print(f"{'layer (forward + backward)':44s} {'ms':>8s} {'x eager':>8s} {'% floor':>8s}")
    for name, t, speedup in rows:
        print(f"{name:44s} {t * 1e3:8.1f} {speedup:8.2f} {100 * floor / t:7.0f}%")
    print(f"grouter vs eager experts: {eager / t_grouter:.2f}x (block), "
          f"{times['Olmoe experts=eager, fixed routes'] / times['Olmoe experts=grouter, fixed routes']:.2f}x "
          f"(experts alone); fixed vs learned routing: {t_learned / t_fixed:.2f}x")


if __name__ == "__main__":
    main()
