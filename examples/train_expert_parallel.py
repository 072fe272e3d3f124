"""Train a small MoE language model with expert parallelism and routes known ahead.

    torchrun --nproc-per-node 2 examples/train_expert_parallel.py                 # gloo, CPU
    torchrun --nproc-per-node 8 examples/train_expert_parallel.py --backend nccl --device cuda

Every rank draws the same global batch of byte sequences (the demo corpus) and routes all of it
with the same frozen Grouter, so each rank knows every rank's routes: the all-to-all split sizes
of every MoE layer come without a count exchange. Experts are placed on ranks by the Grouter's
co-activation affinity and each sequence goes to the rank hosting most of its routes. Dense
weights are replicated (their gradients all-reduced); experts are split over the ranks.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from grouter import Grouter, affinity
from grouter.demo.corpus import VOCAB, Corpus, load_corpus
from grouter.demo.lm import MoELM
from grouter.parallel import (ExpertParallelMoE, assign_samples, comm_stats, contiguous_placement,
                              contiguous_sample_ranks, cross_rank_fraction, place_experts, reset_comm_stats,
                              routes_by_rank)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=16, help="global batch, in sequences")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--grouter", help="a saved Grouter over bytes (vocabulary 256); default: a fresh one")
    p.add_argument("--placement", choices=("affinity", "contiguous"), default="affinity")
    p.add_argument("--no-assign", action="store_true", help="keep sequences in data order (no sample assignment)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="gloo")
    p.add_argument("--device", default="cpu")
    p.add_argument("--log-every", type=int, default=10)
    return p.parse_args(argv)


def main(argv=None) -> float:
    args = parse_args(argv)
    device = torch.device("cpu")
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    log = print if rank == 0 else (lambda *a, **k: None)

    corpus = Corpus(*load_corpus())
    torch.manual_seed(args.seed)
    if args.grouter:
        g = Grouter.load(args.grouter)
        if g.vocab_size != VOCAB:
            raise SystemExit(f"--grouter: this example routes bytes; {args.grouter} reads {g.vocab_size} token ids")
    else:
        g = Grouter(VOCAB, args.experts, args.top_k, d_model=64, n_layers=1, n_heads=2)
    g = g.to(device).eval().requires_grad_(False)
    E = g.num_experts
    if args.placement == "affinity":
        placement = place_experts(affinity(g, [next(corpus.train_batches(10_000 + i, 16, args.seq)) for i in range(4)]),
                                  world)
    else:
        placement = contiguous_placement(E, world)

    model = MoELM(args.d_model, args.layers, 4, E, g.top_k, args.d_model, args.seed).to(device)
    for block in model.blocks:
        block.moe = ExpertParallelMoE(block.moe, placement=placement)
    dense = [p for n, p in model.named_parameters() if ".experts." not in n]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    log(f"{world} ranks, {E} experts top-{g.top_k}, placement {placement.tolist()}, "
        f"rank 0 hosts {model.blocks[0].moe.local_experts}")

    data = corpus.train_batches(args.seed, args.batch, args.seq)
    started, tokens, loss_avg = time.perf_counter(), 0, float("nan")
    for step in range(1, args.steps + 1):
        batch = next(data).to(device)  # the same global batch on every rank
        with torch.no_grad():
            ids, w = g.route(batch)  # routes of the whole global batch, known before the step
        ranks = contiguous_sample_ranks(args.batch, world) if args.no_assign else assign_samples(ids.cpu(), placement)
        mine = (ranks == rank).nonzero().flatten().to(device)
        every = [r.cpu() for r in routes_by_rank(ids, ranks, world)]  # host copies: split sizes
        reset_comm_stats()
        routing = model.blocks[0].moe.prepare(ids[mine], w[mine], global_expert_ids=every)  # once for all layers
        x = batch[mine]
        logits = model(x, routing)
        # Scaled so that the ranks' losses sum to the mean over the global batch.
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1), reduction="sum")
        loss = loss / (args.batch * (args.seq - 1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p in dense:  # replicated weights: sum the ranks' gradients (experts already have theirs)
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        tokens += args.batch * args.seq
        loss_avg = total.item() if step == 1 else 0.9 * loss_avg + 0.1 * total.item()
        if step == 1 or step % args.log_every == 0 or step == args.steps:
            s = comm_stats()
            crossing = cross_rank_fraction(ids.cpu(), placement, ranks)
            log(f"step {step}: loss {loss_avg:.3f}, {tokens / (time.perf_counter() - started):,.0f} tok/s, "
                f"sent {s.bytes_sent / 2**20:.2f} MiB/step from rank 0, count exchanges {s.count_exchanges}, "
                f"pairs crossing ranks {crossing:.1%}")
    dist.barrier()  # no rank tears gloo down while another still talks to it (that aborts at exit)
    dist.destroy_process_group()
    return loss_avg


if __name__ == "__main__":
    main()
