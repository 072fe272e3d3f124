"""Train a small MoE language model with expert x data parallelism and routes known ahead.

    torchrun --nproc-per-node 2 examples/train_expert_parallel.py                  # 2 EP ranks, gloo, CPU
    torchrun --nproc-per-node 4 examples/train_expert_parallel.py --dp 2 --save ckpt   # 2 EP x 2 DP
    torchrun --nproc-per-node 4 examples/train_expert_parallel.py --resume ckpt --save ckpt2   # on 4 EP ranks
    torchrun --nproc-per-node 2 examples/train_expert_parallel.py --bf16                          # bf16 compute
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
        examples/train_expert_parallel.py --dp 2 --backend nccl --device cuda           # several nodes

The ranks form a ("dp", "ep") DeviceMesh: experts are DTensor shards over "ep" (replicated over
"dp"), the dense weights are FSDP2-sharded over the same mesh (grouter.parallel.fully_shard_dense).
The model is built on the meta device (no memory, no initialisation), sharded, then materialised
with `to_empty` and initialised shard by shard; `--bf16` computes in bf16 from fp32 parameters
(an FSDP2 MixedPrecisionPolicy, experts included; gradients reduced in fp32).
Every rank draws the same global batch of byte sequences (the demo corpus) and routes all of it with
the same frozen Grouter, so each rank knows every rank's routes: the all-to-all split sizes come
without a count exchange. Experts are placed on ranks by the Grouter's co-activation affinity (the
Grouter relabelled so each rank's experts are consecutive: checkpoints list experts in order), each
data-parallel replica takes its share of the batch, and inside it each sequence goes to the rank
hosting most of its routes. Checkpoints are torch.distributed.checkpoint folders (model, optimizer,
step, and the experts' numbering): they resume on any number of ranks, the Grouter renumbered as the
checkpoint's experts are (grouter.parallel.renumber_experts), whatever placement this size would pick.
"""

from __future__ import annotations

import argparse
import os
import time
import zlib

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.tensor import DTensor, distribute_tensor

from grouter import Grouter, affinity
from grouter.demo.corpus import VOCAB, Corpus, load_corpus
from grouter.demo.lm import MoELM
from grouter.parallel import (ExpertParallelMoE, assign_samples, comm_stats, contiguous_placement,
                              contiguous_sample_ranks, cross_rank_fraction, fully_shard_dense, global_mean,
                              place_experts, relabel_experts, renumber_experts, reset_comm_stats,
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
    p.add_argument("--dp", type=int, default=1, help="data-parallel replicas (the ranks are dp x ep)")
    p.add_argument("--save", help="write a DCP checkpoint (model, optimizer, step) here at the end")
    p.add_argument("--resume", help="continue from this DCP checkpoint (--steps more steps)")
    p.add_argument("--bf16", action="store_true", help="compute in bf16 (fp32 parameters and gradient reductions)")
    return p.parse_args(argv)


def checkpoint_state(model, opt, step: int, expert_order) -> dict:
    """What a checkpoint holds: model and optimizer (DTensor shards: DCP saves each once), step, and
    the numbering of the experts (each layer's state records it too, and refuses another)."""
    model_state, optim_state = get_state_dict(model, opt)
    return {"model": model_state, "optim": optim_state, "step": torch.tensor(step), "expert_order": expert_order}


def checkpoint_expert_order(path: str, num_experts: int) -> torch.Tensor:
    order = torch.empty(num_experts, dtype=torch.long)
    dcp.load({"expert_order": order}, checkpoint_id=path)  # only this entry is read
    return order


@torch.no_grad()
def init_weights(model, seed: int) -> None:
    """Initialise a materialised (to_empty) model shard by shard: each parameter's values depend
    only on its name and the seed, so every layout (dp x ep) starts from the same model."""
    for name, p in model.named_parameters():
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        if p.dim() == 1:  # RMSNorm scales
            full = torch.ones(p.shape)
        elif name.endswith("embed.weight"):
            full = torch.randn(p.shape, generator=g) * 0.02
        else:  # nn.Linear's range, fan-in = the last dimension (the experts' too)
            bound = p.shape[-1] ** -0.5
            full = torch.empty(p.shape).uniform_(-bound, bound, generator=g)
        full = full.to(device=p.device, dtype=p.dtype)
        p.copy_(distribute_tensor(full, p.device_mesh, p.placements) if isinstance(p, DTensor) else full)


def main(argv=None) -> float:
    args = parse_args(argv)
    device = torch.device("cpu")
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % args.dp:
        raise SystemExit(f"--dp {args.dp} does not divide the {world} ranks")
    ep = world // args.dp
    mesh = init_device_mesh(device.type, (args.dp, ep), mesh_dim_names=("dp", "ep"))
    if args.dp == 1:
        mesh = mesh["ep"]  # expert parallelism alone: a 1-D mesh
    dp_rank, ep_rank = divmod(rank, ep)
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
    placement = contiguous_placement(E, ep)
    if args.resume:  # the checkpoint's experts, whatever this size's affinity placement would be
        g = renumber_experts(g, checkpoint_expert_order(args.resume, E))
    elif args.placement == "affinity":
        batches = [next(corpus.train_batches(10_000 + i, 16, args.seq)) for i in range(4)]
        g, placement = relabel_experts(g, place_experts(affinity(g, batches), ep))

    with torch.device("meta"):  # no memory and no initialisation until the model is sharded
        model = MoELM(args.d_model, args.layers, 4, E, g.top_k, args.d_model, args.seed)
        for block in model.blocks:
            block.moe = ExpertParallelMoE(block.moe, placement=placement, mesh=mesh, expert_order=g.expert_order)
    policy = MixedPrecisionPolicy(torch.bfloat16, reduce_dtype=torch.float32) if args.bf16 else MixedPrecisionPolicy()
    fully_shard_dense(model, blocks=model.blocks, mp_policy=policy)  # each block an FSDP unit, then the root
    model.to_empty(device=device)
    init_weights(model, args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    start = 0
    if args.resume:
        state = checkpoint_state(model, opt, 0, g.expert_order)
        dcp.load(state, checkpoint_id=args.resume)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        start = int(state["step"])
    log(f"{world} ranks = {args.dp} dp x {ep} ep, {E} experts top-{g.top_k}, rank 0 hosts "
        f"{model.blocks[0].moe.local_experts}" + (f", resumed at step {start}" if start else ""))

    data = corpus.train_batches(args.seed, args.batch, args.seq)
    for _ in range(start):  # the batches the checkpoint's steps used
        next(data)
    share = args.batch // args.dp
    started, tokens, loss_avg = time.perf_counter(), 0, float("nan")
    for step in range(start + 1, start + args.steps + 1):
        batch = next(data).to(device)  # the same global batch on every rank
        with torch.no_grad():
            ids, w = g.route(batch)  # routes of the whole global batch, known before the step
        lo = dp_rank * share  # this data-parallel replica's sequences, then this rank's among them
        batch, ids, w = batch[lo:lo + share], ids[lo:lo + share], w[lo:lo + share]
        ranks = contiguous_sample_ranks(share, ep) if args.no_assign else assign_samples(ids.cpu(), placement)
        mine = (ranks == ep_rank).nonzero().flatten().to(device)
        every = [r.cpu() for r in routes_by_rank(ids, ranks, ep)]  # host copies: split sizes
        reset_comm_stats()
        routing = model.blocks[0].moe.prepare(ids[mine], w[mine], global_expert_ids=every)  # once for all layers
        x = batch[mine]
        logits = model(x, routing)
        loss_sum = F.cross_entropy(logits[:, :-1].float().reshape(-1, VOCAB), x[:, 1:].reshape(-1), reduction="sum")
        loss = global_mean(loss_sum, x.shape[0] * (args.seq - 1))  # this rank's share of the global mean
        opt.zero_grad(set_to_none=True)
        loss.backward()  # gradients summed over ranks: FSDP2 for dense weights, EP for experts
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the global norm (DTensors)
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        tokens += args.batch * args.seq
        loss_avg = total.item() if step == start + 1 else 0.9 * loss_avg + 0.1 * total.item()
        if step == start + 1 or step % args.log_every == 0 or step == start + args.steps:
            s = comm_stats()
            crossing = cross_rank_fraction(ids.cpu(), placement, ranks)
            log(f"step {step}: loss {loss_avg:.3f} (this step {total.item():.5f}), {tokens / (time.perf_counter() - started):,.0f} tok/s, "
                f"sent {s.bytes_sent / 2**20:.2f} MiB/step from rank 0, count exchanges {s.count_exchanges}, "
                f"pairs crossing ranks {crossing:.1%}")
    if args.save:
        dcp.save(checkpoint_state(model, opt, step, g.expert_order), checkpoint_id=args.save)
        log(f"saved step {step} to {args.save}")
    dist.barrier()  # no rank tears gloo down while another still talks to it (that aborts at exit)
    dist.destroy_process_group()
    return loss_avg


if __name__ == "__main__":
    main()
