"""One rank of the construction tests: `python init_worker.py OUT_DIR CASE`.

mismatch: the last rank wraps a MoE with another expert count; every rank must raise (no hang).
meta: the MoE is built on the meta device (FSDP2's init flow), wrapped, materialised with
to_empty and loaded from the single-process MoE's full state_dict; outputs and gradients are saved.
"""

import datetime
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from grouter import nn as gnn
from grouter.parallel import ExpertParallelMoE

H, I, E, K, T = 16, 8, 8, 2, 24


def single(seed=0):
    torch.manual_seed(seed)
    moe = gnn.MoE(H, I, E, K)
    x = torch.randn(T, H)
    ids = torch.rand(T, E).topk(K, dim=1).indices
    w = torch.rand(T, K)
    return moe, x, ids, w


def main(out_dir: str, case: str):
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(out_dir) / f"{case}.{rank}.pt"
    if case == "mismatch":
        moe = gnn.MoE(H, I, E + 1 if rank == world - 1 else E, K)  # 9 experts: not a whole number per rank
        try:
            ExpertParallelMoE(moe)
            torch.save(dict(error=None), out)
        except ValueError as e:
            torch.save(dict(error=str(e)), out)
    else:
        full, x, ids, w = single()
        with torch.device("meta"):
            moe = gnn.MoE(H, I, E, K)
        ep = ExpertParallelMoE(moe)
        ep.to_empty(device="cpu")
        ep.load_state_dict(full.state_dict())
        mine = slice(rank * T // world, (rank + 1) * T // world)
        xr = x[mine].clone().requires_grad_(True)
        y = ep(xr, routing=(ids[mine], w[mine]))
        y.sum().backward()
        torch.save(dict(out=y.detach(), x_grad=xr.grad, down_grad=ep.experts.down_proj.grad.to_local(),
                        local=ep.local_experts), out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2])
