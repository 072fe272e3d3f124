"""Train a torchtitan Qwen3-MoE routed by a Grouter, on pre-dispatched routes, on 1 or more gloo ranks.

    python examples/train_titan_predispatch.py --out titan_run                                # 1 process
    torchrun --standalone --nproc-per-node 2 examples/train_titan_predispatch.py --out titan_run   # 2 EP ranks
    ... --grouter PATH          # a saved Grouter (grouter distill/fold/tune); default: a fresh small one

Rank 0 routes the token samples once with the frozen Grouter into OUT/routes (grouter.predispatch;
reused when it is already there and was routed by this Grouter). Every rank builds the model on the
meta device, converts it (grouter.titan.convert: fixed router, grouter dispatch and experts),
materialises and initialises it, shards its experts over an "ep" mesh of all ranks
(grouter.titan.expert_parallel), and trains on its share of the samples through torchtitan's
ParallelAwareDataloader; every batch carries every rank's expert counts, so the all-to-all splits of
each step are known before it. The loss is the global mean (each rank's sum over the global token
count), dense gradients summed over the ranks: the losses are one process's, on any number of ranks. At the end each MoE layer is checked against grouter's own layer
(grouter.titan.as_grouter_moe: the same expert weights in grouter.nn.MoE) on the same routes.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.distributed.utils import set_spmd_backend

import grouter
import grouter.titan
from grouter.titan.tiny import qwen3_moe_config

VOCAB, EXPERTS, TOP_K, SEQ = 256, 8, 2, 33


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="titan_run")
    p.add_argument("--grouter", help="a saved Grouter (its vocabulary must cover the tokens)")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=8, help="global batch (samples per step, all ranks)")
    p.add_argument("--lr", type=float, default=3e-3)
    args = p.parse_args()

    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        set_spmd_backend("partial_dtensor")  # outside torchtitan's trainer: DTensor on the model-parallel axes
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} does not split over {world} ranks")

    torch.manual_seed(0)
    g = grouter.Grouter.load(args.grouter) if args.grouter else grouter.Grouter(
        VOCAB, EXPERTS, TOP_K, d_model=32, n_layers=1, n_heads=2)
    routes_dir = Path(args.out) / "routes"
    if rank == 0 and not (routes_dir / "header.json").exists():
        samples = torch.randint(0, g.vocab_size, (args.samples, SEQ), generator=torch.Generator().manual_seed(1))
        grouter.predispatch(g, samples, routes_dir, progress=False)
    if distributed:
        dist.barrier()
    reader = grouter.PredispatchReader(routes_dir, g)  # refuses routes of another Grouter

    with torch.device("meta"):
        model = qwen3_moe_config(vocab_size=g.vocab_size, num_experts=g.num_experts, top_k=g.top_k).build()
    grouter.titan.convert(model, None)  # routes only from the batches
    model.to_empty(device="cpu")
    # Initialised whole, the same on every rank, then sharded: any number of ranks starts from the
    # same weights (a large model would load a checkpoint into its shards instead).
    torch.manual_seed(0)
    model.init_weights(buffer_device=torch.device("cpu"))
    if distributed:
        grouter.titan.expert_parallel(model, init_device_mesh("cpu", (world,), mesh_dim_names=("ep",)))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)

    data = grouter.titan.PredispatchedDataset(reader, rank=rank, world_size=world, counts_by_rank=True,
                                              infinite=True)
    loader = ParallelAwareDataloader(data, dp_rank=rank, dp_world_size=world, batch_size=args.batch // world,
                                     collate_fn=grouter.titan.PredispatchedDataset.collate)
    for step, (input_dict, labels) in zip(range(args.steps), loader):
        inputs = input_dict.pop("input")
        logits = model(inputs, **input_dict)  # as torchtitan's trainer calls it
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
        loss = loss / (labels.numel() * world)
        opt.zero_grad()
        loss.backward()
        if distributed:
            for param in model.parameters():
                if not isinstance(param, DTensor):  # dense: summed over the ranks; experts: already whole
                    dist.all_reduce(param.grad)
        opt.step()
        total = loss.detach().clone()
        if distributed:
            dist.all_reduce(total)
        if rank == 0:
            print(f"step {step}: loss {total.item():.4f}", flush=True)

    # Each MoE layer against grouter's own layer on the same routes (the last batch's tokens).
    with torch.no_grad():
        hidden = torch.randn(*inputs.shape, model.tok_embeddings.weight.shape[1], generator=torch.Generator().manual_seed(rank))
        ids, w = input_dict["grouter_expert_ids"], input_dict["grouter_weights"]
        worst = 0.0
        for name, moe in grouter.titan.moe_layers(model):
            model.grouter_routes.prepare(ids, w, inputs)  # the step's routes, outside a model forward
            ours = moe(hidden)
            theirs = grouter.titan.as_grouter_moe(moe)(hidden, routing=(ids, w))
            worst = max(worst, (ours - theirs).abs().max().item())
    print(f"rank {rank}: max |converted - grouter.nn.MoE| over {len(grouter.titan.moe_layers(model))} layers: "
          f"{worst:.2e}", flush=True)
    if worst > 1e-5:
        raise SystemExit(f"rank {rank}: the converted layers differ from grouter.nn.MoE by {worst:.2e}")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
