"""One rank of the expert-parallel tests: `python ep_worker.py OUT_DIR SEED CASE [CASE ...]`.

Started by tests/parallel/launch.py with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set. Every
rank builds the same global batch, runs its own tokens through ExpertParallelMoE, and saves its
outputs, gradients and communication counts to OUT_DIR/<case>.<rank>.pt for the test to compare.
"""

import datetime
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # `reference` (the spec) and `ep_cases`

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from grouter.parallel import ExpertParallelMoE, ParallelRouting, comm_stats, reset_comm_stats  # noqa: E402
from ep_cases import build, run  # noqa: E402


def main(out_dir: str, seed: int, cases):
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    for name in cases:
        c, layers, x, ids, w, grad_out, placement = build(name, world, seed)
        start = sum(c["counts"][:rank])
        mine = slice(start, start + c["counts"][rank])
        if c["mode"] == "placement_mismatch":
            try:
                ExpertParallelMoE(layers[0], placement=placement.flip(1) if rank == world - 1 else placement)
                error = None
            except ValueError as e:
                error = str(e)
            torch.save(dict(error=error), Path(out_dir) / f"{name}.{rank}.pt")
            continue
        ep = [ExpertParallelMoE(m, placement=placement) for m in layers]
        x_r = x[mine].clone().requires_grad_(True)
        w_r = w[mine].clone().requires_grad_(True)
        reset_comm_stats()
        if c["mode"] == "exchange":
            out = run(ep, x_r, lambda i: (ids[mine], w_r))
        elif c["mode"] == "global":
            every = [ids[sum(c["counts"][:r]):sum(c["counts"][:r + 1])] for r in range(world)]
            r = ep[0].prepare(ids[mine], w_r, global_expert_ids=every)
            out = run(ep, x_r, lambda i: r)
        elif c["mode"] == "mismatch":
            every = [ids[sum(c["counts"][:r]):sum(c["counts"][:r + 1])] for r in range(world)]
            if rank == world - 1:
                every[0] = every[0][1:]
            try:
                ep[0].prepare(ids[mine], w_r, global_expert_ids=every, check=True)
                error = None
            except ValueError as e:
                error = str(e)
            torch.save(dict(error=error), Path(out_dir) / f"{name}.{rank}.pt")
            continue
        elif c["mode"] == "shared":
            r = ParallelRouting.prepare(ids[mine], w_r, placement)
            out = run(ep, x_r, lambda i: r)
        else:
            out = run(ep, x_r, lambda i: None)
        forward_stats = comm_stats()
        out.backward(grad_out[mine])
        result = dict(out=out.detach(), x_grad=x_r.grad, w_grad=w_r.grad, local_experts=[m.local_experts for m in ep],
                      expert_grads=[(m.experts.gate_up_proj.grad.to_local(), m.experts.down_proj.grad.to_local()) for m in ep],
                      forward_stats=vars(forward_stats), stats=vars(comm_stats()))
        if c["mode"] == "router":
            grads = [m.router.weight.grad for m in ep]
            for gr in grads:
                dist.all_reduce(gr)  # replicated router: data-parallel gradient sum
            result["router_grads"] = grads
        torch.save(result, Path(out_dir) / f"{name}.{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
