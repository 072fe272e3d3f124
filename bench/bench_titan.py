"""torchtitan's MoE layer, its own vs converted to grouter; and its expert parallelism with splits
known ahead. CPU (fp32 parameters), steps = forward + backward.

    python bench/bench_titan.py [--tokens 8192] [--hidden 512] [--inter 256] [--experts 16] [--top-k 2]
                                [--steps 10] [--ranks 2 4] [--ep-tokens 4096]

1. One MoE layer, T tokens: torchtitan's own (TokenChoiceTopKRouter + LocalTokenDispatcher +
   GroupedExperts, which computes in bf16 always: torch._grouped_mm, slow on a CPU) vs torchtitan's
   router and dispatcher with grouter's fp32 experts (isolates the dispatch) vs
   `grouter.titan.convert(experts=False)` (fixed routes, grouter permute/unpermute, torchtitan's
   bf16 experts) vs `convert` (grouter dispatch and grouter.ops.expert_mlp in fp32). Median step
   time, configurations interleaved step by step.
2. The same layer under torchtitan's expert parallelism on W gloo ranks (torchrun, experts sharded
   as DTensors, AllToAllTokenDispatcher wired to an "ep" mesh), each rank T_ep tokens routed by a
   random fixed routing: torchtitan's dispatcher (count all-to-all + host sync per layer) vs
   grouter's with one all-gather of counts per step vs with every rank's counts known ahead.
   Median step time, collectives per step, host syncs per step, all-to-all bytes per step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

LAYER_CONFIGS = ("torchtitan", "torchtitan+grouter_experts", "grouter_dispatch", "grouter")
EP_CONFIGS = ("torchtitan", "exchange", "known")


def make_layer(args, config, seed=0):
    from torchtitan.models.common.config_utils import make_moe_config, make_routed_experts_config, make_router_config

    import grouter.titan as gt

    init = {"weight": lambda w: torch.nn.init.normal_(w, std=0.02)}
    cfg = make_moe_config(
        num_experts=args.experts,
        router=make_router_config(dim=args.hidden, num_experts=args.experts, gate_param_init=init, top_k=args.top_k,
                                  score_func="softmax", route_norm=True),
        routed_experts=make_routed_experts_config(
            dim=args.hidden, hidden_dim=args.inter, num_experts=args.experts, top_k=args.top_k,
            param_init={n: init["weight"] for n in ("w1_EFD", "w2_EDF", "w3_EFD")}, comm_backend="standard"))
    torch.manual_seed(seed)
    moe = cfg.build()
    moe.init_states(buffer_device=torch.device("cpu"))
    if config.startswith("torchtitan"):
        if config == "torchtitan+grouter_experts":  # isolates the dispatch: both sides fp32 grouter experts
            moe.routed_experts.inner_experts.__class__ = gt.GrouterExperts
        return moe, None
    holder = torch.nn.Module()
    holder.moe = moe
    gt.convert(holder, None, experts=(config != "grouter_dispatch"))
    return moe, holder.grouter_routes


def random_routes(T, E, K, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(T, E, generator=g).topk(K, dim=-1).indices
    w = torch.rand(T, K, generator=g).softmax(-1)
    return ids, w


def layer_bench(args):
    T, dev = args.tokens, torch.device(args.device)
    x = torch.randn(1, T, args.hidden, device=dev)
    ids, w = (t.to(dev) for t in random_routes(T, args.experts, args.top_k, 1))
    tokens = torch.zeros(1, T, dtype=torch.long, device=dev)
    layers = {c: make_layer(args, c) for c in LAYER_CONFIGS}
    for moe, _ in layers.values():
        moe.to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times = {c: [] for c in LAYER_CONFIGS}
    for i in range(args.warmup + args.steps):
        for c, (moe, routes) in layers.items():
            h = x.clone().requires_grad_()
            sync()
            t0 = time.perf_counter()
            if routes is not None:
                routes.prepare(ids.view(1, T, -1), w.view(1, T, -1), tokens)
            moe(h).square().mean().backward()
            sync()
            if i >= args.warmup:
                times[c].append(time.perf_counter() - t0)
    med = {c: statistics.median(v) * 1e3 for c, v in times.items()}
    print(f"\n1. One torchtitan MoE layer step (forward + backward), T={T} H={args.hidden} I={args.inter} "
          f"E={args.experts} K={args.top_k}, {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.steps}")
    print("| layer | ms/step | vs torchtitan |\n| --- | ---: | ---: |")
    for c in LAYER_CONFIGS:
        print(f"| {c} | {med[c]:.1f} | {med['torchtitan'] / med[c]:.2f}x |")
    return med


# --- expert parallelism ------------------------------------------------------------------------

def launch(W, args):
    out_dir = tempfile.mkdtemp(prefix="bench_titan_")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={W}", __file__,
           "--worker", "--tokens", str(args.ep_tokens), "--hidden", str(args.hidden), "--inter", str(args.inter),
           "--experts", str(args.experts), "--top-k", str(args.top_k), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--result-dir", out_dir]
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"bench_titan: {W} ranks failed\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return [json.loads((Path(out_dir) / f"{r}.json").read_text()) for r in range(W)]


def worker(args):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.utils._python_dispatch import TorchDispatchMode
    from torchtitan.distributed.utils import set_spmd_backend
    from torchtitan.models.common.token_dispatcher import AllToAllTokenDispatcher

    from grouter.titan import FixedRouter

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops, self.a2a_bytes = Counter(), 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace in ("c10d", "_c10d_functional"):
                self.ops[func.__name__.split(".")[0]] += 1
                if func.__name__.startswith("all_to_all_single"):
                    self.a2a_bytes += args[0].numel() * args[0].element_size()
            return func(*args, **(kwargs or {}))

    syncs = Counter()
    stock_sync = AllToAllTokenDispatcher._sync_token_count_exchange

    def counting_sync(self, *a):
        syncs["n"] += 1
        return stock_sync(self, *a)

    AllToAllTokenDispatcher._sync_token_count_exchange = counting_sync
    set_spmd_backend("partial_dtensor")
    dist.init_process_group("gloo")
    rank, W = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (W,), mesh_dim_names=("ep",))
    T, E, K = args.tokens, args.experts, args.top_k
    layers = {}
    for c in EP_CONFIGS:
        moe, routes = make_layer(args, "grouter")
        if c == "torchtitan":  # torchtitan's own EP dispatcher, fed the same fixed routes
            moe.routed_experts.token_dispatcher = AllToAllTokenDispatcher(AllToAllTokenDispatcher.Config(
                num_experts=E, top_k=K))
            routes.dispatchers = []  # so the step computes no splits of its own
        else:
            routes.dispatchers = [moe.routed_experts.token_dispatcher]
        inner = moe.routed_experts.inner_experts
        for n in ("w1_EFD", "w2_EDF", "w3_EFD"):
            setattr(inner, n, torch.nn.Parameter(distribute_tensor(getattr(inner, n).detach(), mesh, [Shard(0)])))
        moe.routed_experts.token_dispatcher.wire_meshes(ep_mesh=mesh)
        assert isinstance(moe.router, FixedRouter)
        layers[c] = (moe, routes)
    x = torch.randn(1, T, args.hidden, generator=torch.Generator().manual_seed(rank))
    all_routes = [random_routes(T, E, K, 100 + r) for r in range(W)]
    ids, w = all_routes[rank]
    counts = torch.stack([torch.bincount(i.reshape(-1), minlength=E) for i, _ in all_routes])
    times = {c: [] for c in EP_CONFIGS}
    stats = {}
    for i in range(args.warmup + args.steps):
        for c, (moe, routes) in layers.items():
            h = x.clone().requires_grad_()
            counter = Count()
            s0, e0 = syncs["n"], routes.count_exchanges
            dist.barrier()
            t0 = time.perf_counter()
            with counter:
                routes.prepare(ids.view(1, T, K), w.view(1, T, K), torch.zeros(1, T, dtype=torch.long),
                               counts if c == "known" else None)
                moe(h).square().mean().backward()
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                times[c].append(dt)
            stats[c] = dict(ops=dict(counter.ops), host_syncs=syncs["n"] - s0 + routes.count_exchanges - e0,
                            a2a_bytes=counter.a2a_bytes)
    (Path(args.result_dir) / f"{rank}.json").write_text(json.dumps(dict(rank=rank, W=W, times=times, stats=stats)))
    dist.destroy_process_group()


def ep_bench(args):
    rows = {}
    for W in args.ranks:
        results = launch(W, args)
        print(f"\n2. torchtitan expert parallelism, {W} gloo ranks, {args.ep_tokens} tokens per rank, one MoE layer "
              f"(H={args.hidden} I={args.inter} E={args.experts} K={args.top_k}), median of {args.steps} steps "
              f"(slowest rank per step)")
        print("| dispatcher | ms/step | collectives/step (rank 0) | host syncs/step | all-to-all MB/step (all ranks) |")
        print("| --- | ---: | --- | ---: | ---: |")
        for c in EP_CONFIGS:
            per_step = [max(r["times"][c][i] for r in results) for i in range(args.steps)]
            s = results[0]["stats"][c]
            mb = sum(r["stats"][c]["a2a_bytes"] for r in results) / 1e6
            ops = ", ".join(f"{k} {v}" for k, v in sorted(s["ops"].items()))
            rows[(W, c)] = statistics.median(per_step) * 1e3
            print(f"| {c} | {rows[(W, c)]:.1f} | {ops} | {s['host_syncs']} | {mb:.1f} |")
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--ep-tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--inter", type=int, default=256)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--ranks", type=int, nargs="*", default=[2, 4], help="gloo EP worlds (CPU); none: skip")
    p.add_argument("--device", default="cpu", help="the layer step's device (cuda: `--device cuda --ranks`)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result-dir", help=argparse.SUPPRESS)
    p.add_argument("--skip-layer", action="store_true")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if not args.skip_layer:
        layer_bench(args)
    if args.ranks:
        ep_bench(args)


if __name__ == "__main__":
    main()
