"""Expert parallelism on gloo, 2 and 4 ranks on one machine: placement and routes known ahead.

    python bench/bench_parallel.py [--demo DIR] [--ranks 2 4] [--steps 10] [--seq 128] [--placement-only]

Routes come from a `grouter demo` output (default ./grouter_demo, else `grouter demo --quick` run
here into bench/.grouter_quick): its distilled Grouter of seed 0 routing its BPE-token corpus.

1. Pairs crossing ranks: the fraction of token-expert pairs whose expert lives on another rank
   than their sequence, for contiguous vs affinity placement, without and with sample assignment
   (and, for 8 experts, the best of all placements with sample assignment).
2. Steps of a stack of MoE layers (forward + backward, fixed routes) under torchrun/gloo:
   median step time (configurations interleaved step by step), activation bytes sent across ranks
   per step (all ranks together, forward and backward), count exchanges per step, for
     exchange    contiguous placement, data order, routes given to each layer: a count exchange per layer
     ahead       contiguous placement, data order, the step's routes planned once from the whole
                 global batch's routes: no count exchange
     affinity    affinity placement, data order, routes ahead
     aff+assign  affinity placement, each sequence on the rank hosting most of its pairs, routes ahead
     dp2 x ep    (4 ranks) expert x data parallelism on a ("dp", "ep") = 2 x 2 DeviceMesh: each
                 data-parallel half of the batch runs aff+assign over 2 expert-parallel ranks; the
                 experts' gradients are then summed over "dp" (their bytes in their own column)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CONFIGS = {  # name: (placement, sample assignment, routes known ahead)
    "exchange": ("contiguous", False, False),
    "ahead": ("contiguous", False, True),
    "affinity": ("affinity", False, True),
    "aff+assign": ("affinity", True, True),
}


# ------------------------------------------------------------------------------------------------
# Parent: routes, placement analysis, launches.


def load_demo(path):
    """(the demo's seed-0 Grouter, its token corpus, where they came from)."""
    from grouter import Grouter
    from grouter.demo import run_demo
    from grouter.demo.subwords import load_token_corpus

    candidates = [path] if path else ["grouter_demo", str(Path(__file__).parent / ".grouter_quick")]
    found = next((c for c in candidates if (Path(c) / "stages" / "grouter_s0" / "config.json").exists()), None)
    where = found
    if found is None:
        if path:
            raise SystemExit(f"bench_parallel: no finished demo in {path}")
        found = candidates[-1]
        run_demo(found, quick=True, resume=True, progress=False)
        where = found + " (made now)"
    root = Path(found) / "stages"
    return Grouter.load(root / "grouter_s0"), load_token_corpus(root / "tokens"), where


def best_of_all_placements(ids, E, W):
    from grouter.parallel import assign_samples, cross_rank_fraction

    def partitions(rest):
        if not rest:
            yield []
            return
        for comb in itertools.combinations(rest[1:], E // W - 1):
            group = [rest[0], *comb]
            for tail in partitions([e for e in rest if e not in group]):
                yield [group] + tail

    return min(cross_rank_fraction(ids, torch.tensor(p), assign_samples(ids, torch.tensor(p)))
               for p in partitions(list(range(E))))


def placement_table(g, corpus, seq, samples=256, worlds=(2, 4, 8)):
    from grouter import affinity
    from grouter.parallel import assign_samples, contiguous_placement, cross_rank_fraction, place_experts

    E = g.num_experts
    A = affinity(g, [next(corpus.train_batches(10_000 + i, 16, seq)) for i in range(16)])
    with torch.no_grad():
        ids, _ = g.route(next(corpus.train_batches(777, samples, seq)))
    rows = []
    for W in worlds:
        if E % W:
            continue
        cont, aff = contiguous_placement(E, W), place_experts(A, W)
        row = dict(W=W, contiguous=cross_rank_fraction(ids, cont),
                   contiguous_assign=cross_rank_fraction(ids, cont, assign_samples(ids, cont)),
                   affinity=cross_rank_fraction(ids, aff),
                   affinity_assign=cross_rank_fraction(ids, aff, assign_samples(ids, aff)))
        row["cut"] = 1 - row["affinity_assign"] / row["contiguous"]
        if E <= 8 and W < E:
            row["best_assign"] = best_of_all_placements(ids, E, W)
        rows.append(row)
    return rows, A


def make_inputs(g, corpus, A, args, path):
    from grouter.parallel import assign_samples, contiguous_placement, contiguous_sample_ranks, place_experts

    steps = args.warmup + args.steps
    data = corpus.train_batches(args.seed, args.batch, args.seq)
    with torch.no_grad():
        routes = [g.route(next(data)) for _ in range(steps)]
    ids = torch.stack([r[0] for r in routes])
    w = torch.stack([r[1] for r in routes]).float()
    per_world = {}
    for W in args.ranks:
        placements = {"contiguous": contiguous_placement(g.num_experts, W), "affinity": place_experts(A, W)}
        order = contiguous_sample_ranks(args.batch, W)
        assigned = torch.stack([assign_samples(ids[s], placements["affinity"]) for s in range(steps)])
        per_world[W] = dict(placements=placements, order=order, assigned=assigned)
        if W % 2 == 0 and W >= 4:  # 2 data-parallel replicas of W/2 expert-parallel ranks
            ep = W // 2
            dp_placement = place_experts(A, ep)
            half = args.batch // 2
            dp_assigned = torch.stack([torch.cat([d * ep + assign_samples(ids[s][d * half:(d + 1) * half], dp_placement)
                                                  for d in range(2)]) for s in range(steps)])
            per_world[W].update(dp_placement=dp_placement, dp_assigned=dp_assigned)
    torch.save(dict(ids=ids, weights=w, per_world=per_world, E=g.num_experts, K=g.top_k), path)


def launch(W, inputs, args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={W}", __file__,
           "--worker", inputs, "--hidden", str(args.hidden), "--intermediate", str(args.intermediate),
           "--layers", str(args.layers), "--warmup", str(args.warmup)]
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    results = [json.loads(line[len("RESULT "):]) for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not results:
        raise SystemExit(f"bench_parallel: {W} ranks failed\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return results


def main():
    p = argparse.ArgumentParser(description="expert parallelism on gloo: placement and routes known ahead")
    p.add_argument("--demo", help="a finished `grouter demo` output folder (default: ./grouter_demo)")
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=32, help="global batch, in sequences")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--placement-only", action="store_true", help="only the crossing-pairs table")
    p.add_argument("--worker")
    args = p.parse_args()
    if args.worker:
        return worker(args)

    g, corpus, where = load_demo(args.demo)
    g.eval()
    print(f"routes: the Grouter of demo {where} ({g.num_experts} experts, top-{g.top_k}, "
          f"{'causal' if g.causal else 'bidirectional'}), {args.seq}-token sequences of its BPE corpus "
          f"(vocabulary {corpus.vocab_size})")
    rows, A = placement_table(g, corpus, args.seq)
    print("\nToken-expert pairs crossing ranks (256 sequences)\n")
    print("| ranks | contiguous | contiguous + assign | affinity | affinity + assign | cut | best placement + assign |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        best = f"{r['best_assign']:.1%}" if "best_assign" in r else "-"
        print(f"| {r['W']} | {r['contiguous']:.1%} | {r['contiguous_assign']:.1%} | {r['affinity']:.1%} | "
              f"{r['affinity_assign']:.1%} | {r['cut']:.1%} | {best} |")
    if args.placement_only:
        return
    print(f"\nSteps: {args.layers} MoE layers, H={args.hidden} I={args.intermediate}, global batch {args.batch} x "
          f"{args.seq} tokens, fp32, gloo, {args.steps} timed steps (median), one thread per rank\n")
    print("| ranks | config | step ms | vs exchange | MiB sent / step | count exchanges / step | "
          "MiB expert grads summed over dp / step |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        inputs = str(Path(tmp) / "inputs.pt")
        make_inputs(g, corpus, A, args, inputs)
        for W in args.ranks:
            results = {r["config"]: r for r in launch(W, inputs, args)}
            base = results["exchange"]["step_s"]
            for name, r in results.items():
                print(f"| {W} | {name} | {r['step_s'] * 1e3:.1f} | {base / r['step_s']:.2f}x | "
                      f"{r['bytes_per_step'] / 2**20:.1f} | {r['count_exchanges_per_step']:.0f} | "
                      f"{r['dp_grad_bytes_per_step'] / 2**20:.1f} |", flush=True)


# ------------------------------------------------------------------------------------------------
# Worker: one rank under torchrun.


def worker(args):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from grouter import nn as gnn
    from grouter.parallel import ExpertParallelMoE, comm_stats, reset_comm_stats, routes_by_rank

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, W = dist.get_rank(), dist.get_world_size()
    data = torch.load(args.worker)
    ids, weights, E, K = data["ids"], data["weights"], data["E"], data["K"]
    setup = data["per_world"][W]
    steps, B, S, _ = ids.shape
    torch.manual_seed(0)
    layers = [gnn.MoE(args.hidden, args.intermediate, E, K) for _ in range(args.layers)]
    configs = dict(CONFIGS)
    models = {name: [ExpertParallelMoE(m, placement=setup["placements"][placement]) for m in layers]
              for name, (placement, _, _) in CONFIGS.items()}
    ep = W
    if "dp_placement" in setup:
        configs["dp2 x ep"] = ("dp", True, True)
        ep = W // 2
        mesh = init_device_mesh("cpu", (2, ep), mesh_dim_names=("dp", "ep"))
        models["dp2 x ep"] = [ExpertParallelMoE(m, placement=setup["dp_placement"], mesh=mesh) for m in layers]
    times = {name: [] for name in configs}
    sent = dict.fromkeys(configs, 0)
    exchanges = dict.fromkeys(configs, 0)
    dp_bytes = dict.fromkeys(configs, 0)
    for step in range(steps):
        x_all = torch.randn(B, S, args.hidden, generator=torch.Generator().manual_seed(step))
        for name, (placement, assign, ahead) in configs.items():  # interleaved: drifts hit all alike
            ranks = setup["assigned"][step] if assign else setup["order"]
            if placement == "dp":
                ranks = setup["dp_assigned"][step]
            mine = (ranks == rank).nonzero().flatten()
            x = x_all[mine].reshape(-1, args.hidden).requires_grad_(True)
            step_ids, step_w = ids[step][mine].reshape(-1, K), weights[step][mine].reshape(-1, K)
            dist.barrier()
            reset_comm_stats()
            t0 = time.perf_counter()
            if placement == "dp":  # the routes of this replica's half, over its expert-parallel ranks
                half = (ranks // ep == rank // ep).nonzero().flatten()
                every = routes_by_rank(ids[step][half], ranks[half] % ep, ep)
                routing = models[name][0].prepare(step_ids, step_w, global_expert_ids=every)
            elif ahead:
                every = routes_by_rank(ids[step], ranks, W)
                routing = models[name][0].prepare(step_ids, step_w, global_expert_ids=every)
            else:
                routing = (step_ids, step_w)  # each layer plans, with its own count exchange
            h = x
            for layer in models[name]:
                h = h + layer(h, routing=routing)
            h.sum().backward()
            dist.barrier()
            elapsed = time.perf_counter() - t0
            if step >= args.warmup:
                s = comm_stats()
                times[name].append(elapsed)
                sent[name] += s.bytes_sent
                exchanges[name] += s.count_exchanges
                dp_bytes[name] += s.dp_grad_bytes
    timed = steps - args.warmup
    for name in configs:
        totals = torch.tensor([float(sent[name]), float(exchanges[name]), statistics.median(times[name]),
                               float(dp_bytes[name])], dtype=torch.float64)
        dist.all_reduce(totals)
        if rank == 0:
            print("RESULT " + json.dumps(dict(config=name, step_s=float(totals[2]) / W,
                                              bytes_per_step=float(totals[0]) / timed,
                                              count_exchanges_per_step=float(totals[1]) / timed / W,
                                              dp_grad_bytes_per_step=float(totals[3]) / timed)), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
