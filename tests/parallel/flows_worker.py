"""One rank of the large-model training flow tests: `python flows_worker.py OUT_DIR SEED CASE [CASE ...]`.

Started by tests/parallel/launch.py on 2 ranks (a 1-D expert-parallel mesh) or 4 (("dp", "ep") =
2 x 2). Each case builds the dp_cases network, makes it expert-parallel with fully_shard_dense, goes
through one flow of large-model training (module surgery, meta-device init, mixed precision, a
mesh listing ranks out of order), trains 3 steps and saves what the test compares with one process
to OUT_DIR/<case>.<world>.<rank>.pt. Misuse cases save the error each rank raised.
"""

import datetime
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict  # noqa: E402
from torch.distributed.device_mesh import DeviceMesh  # noqa: E402
from torch.distributed.fsdp import MixedPrecisionPolicy  # noqa: E402
from torch.nn.utils import parametrize  # noqa: E402

from grouter.parallel import ExpertParallelMoE, fully_shard_dense, global_mean  # noqa: E402
import dp_cases as cases  # noqa: E402
from dp_worker import mesh_for  # noqa: E402

BF16 = {"bf16": MixedPrecisionPolicy(param_dtype=torch.bfloat16),
        "bf16_fp32_reduce": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)}


class Same(torch.nn.Module):
    def forward(self, w):
        return w


def parallel(model, mesh, **fsdp):
    model.moe = ExpertParallelMoE(model.moe, mesh=mesh)
    return fully_shard_dense(model, **fsdp)


def load_full(model, seed):
    """The single-process model's weights (seed `seed`) into the parallel one, the way FSDP2 users do."""
    set_model_state_dict(model, cases.build(seed).state_dict(), options=StateDictOptions(full_state_dict=True))


def surgery(name, model, seed, result):
    """The module surgery of case `name`, done after the layers are built and sharded."""
    if name == "to_dtype":
        model.to(torch.float64).to(torch.float32)  # new Parameter objects, the same values
    elif name == "assign":
        model.load_state_dict(model.state_dict(), assign=True)
    elif name == "to_empty":
        model.to_empty(device="cpu")
        load_full(model, seed)
    elif name == "reset":
        model.moe.experts.reset_parameters()
        result["after_reset"] = replicas(model)
        load_full(model, seed)
    elif name == "parametrize":
        for p in ("gate_up_proj", "down_proj"):
            parametrize.register_parametrization(model.moe.experts, p, Same())


def sum_dense(model):
    """The dense gradients summed over the ranks by hand (what fully_shard_dense does with FSDP2)."""
    for name, p in model.named_parameters():
        if not name.startswith("moe.experts"):
            dist.all_reduce(p.grad)


def replicas(model):
    """This rank's expert shards (equal on every data-parallel replica when training is right)."""
    return {n: p.to_local().detach().clone() for n, p in model.moe.experts.named_parameters()}


def run(name, seed, world, rank, mesh, out):
    result = {}
    if name in ("to_dtype", "assign", "to_empty", "reset", "parametrize"):
        model = parallel(cases.build(seed), mesh)
        surgery(name, model, seed, result)
        result["history"] = cases.train(model, "sgd", seed, world, rank, global_mean)
        if name == "parametrize":
            for p in ("gate_up_proj", "down_proj"):
                parametrize.remove_parametrizations(model.moe.experts, p, leave_parametrized=True)
    elif name == "meta":
        with torch.device("meta"):
            model = parallel(cases.build(seed), mesh)
        model.to_empty(device="cpu")
        load_full(model, seed)
        result["history"] = cases.train(model, "adamw", seed, world, rank, global_mean, clip=0.5)
    elif name in BF16:
        model = parallel(cases.build(seed), mesh, mp_policy=BF16[name])
        result["history"] = cases.train(model, "sgd", seed, world, rank, global_mean)
        result["dtypes"] = sorted({str(p.dtype) for p in model.parameters()})
    elif name == "reversed_mesh":  # the mesh lists the ranks of each "ep" line backwards
        ranks = torch.arange(world).view(-1, 2).flip(1)
        mesh = DeviceMesh("cpu", ranks if world == 4 else ranks[0],
                          mesh_dim_names=("dp", "ep") if world == 4 else ("ep",))
        model = cases.build(seed)
        model.moe = ExpertParallelMoE(model.moe, mesh=mesh)
        try:
            fully_shard_dense(model)
        except ValueError as e:  # FSDP2 would save its shards at the wrong offsets: refused
            result["fsdp_error"] = str(e)
        result["local_experts"] = model.moe.local_experts
        result["history"] = cases.train(model, "sgd", seed, world, rank, global_mean, after_backward=sum_dense)
        # What DCP saves is compared; DTensor.full_tensor() gathers such a mesh in process-group
        # order (torch 2.13), not by mesh coordinate, so it would list the experts swapped.
        dcp.save(model.state_dict(), checkpoint_id=str(out / f"reversed.{world}"))
        torch.save(result, out / f"{name}.{world}.{rank}.pt")
        return
    elif name in ("ep_submesh", "ragged", "order_mismatch"):
        try:
            if name == "ep_submesh":
                ExpertParallelMoE(cases.build(seed).moe, mesh=mesh["ep"])
            elif name == "ragged":
                ExpertParallelMoE(cases.build(seed).moe, mesh=mesh, placement=[[0, 1, 2], [3, 4, 5, 6, 7]])
            else:  # the last rank records another numbering of the experts
                order = torch.arange(cases.E).roll(1) if rank == world - 1 else None
                ExpertParallelMoE(cases.build(seed).moe, mesh=mesh, expert_order=order)
            result["error"] = None
        except ValueError as e:
            result["error"] = str(e)
        torch.save(result, out / f"{name}.{world}.{rank}.pt")
        return
    result["state"] = cases.full_state(model)
    result["grads"] = {k.replace("parametrizations.", "").replace(".original", ""): g
                       for k, g in model.first_grads.items()}
    result["replica"] = replicas(model)
    torch.save(result, out / f"{name}.{world}.{rank}.pt")


def main(out_dir: str, seed: int, names):
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = mesh_for(world)
    for name in names:
        run(name, seed, world, rank, mesh, Path(out_dir))
    dist.barrier()  # every rank's results are saved and no collective is left
    # Leave without tearing the groups down: gloo's threads of the extra meshes' groups once
    # aborted a rank there ("terminate called without an active exception").
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
