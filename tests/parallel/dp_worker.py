"""One rank of the expert x data parallel tests: `python dp_worker.py OUT_DIR SEED CASE [CASE ...]`.

Started by tests/parallel/launch.py. Builds the dp_cases network on every rank, swaps its MoE for
an ExpertParallelMoE on a DeviceMesh (1-D expert-parallel on 2 ranks, ("dp", "ep") = 2 x 2 on 4),
applies fully_shard_dense, trains, and saves what the test compares to OUT_DIR/<case>.<rank>.pt.
"""

import datetime
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402

from grouter.parallel import ExpertParallelMoE, fully_shard_dense, global_mean  # noqa: E402
import dp_cases as cases  # noqa: E402


def mesh_for(world):
    if world == 4:
        return init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))
    return init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))


def expert_parallel(model, mesh, blocks=False):
    model.moe = ExpertParallelMoE(model.moe, mesh=mesh)
    return fully_shard_dense(model, blocks=[model.inp, model.head] if blocks else ())


def attached(seed):
    """A Qwen3-MoE routed by an attached Grouter (the same on every rank and in the test)."""
    sys.path.insert(0, str(HERE.parent / "hf"))
    import grouter.hf
    from hf_models import small_grouter, tiny

    torch.manual_seed(seed)
    return grouter.hf.attach(tiny("qwen3_moe"), small_grouter())


def train_attached(model, seed, rank, world):
    """2 SGD steps, each rank on its 2 sequences of the global batch (mean losses)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        ids = torch.randint(3, 101, (2 * world, 9), generator=torch.Generator().manual_seed(seed + step))
        mine = ids[2 * rank:2 * rank + 2]
        opt.zero_grad()
        model(input_ids=mine, labels=mine).loss.backward()
        opt.step()


def ddp_attached(seed, rank, world):
    """Plain DDP, default arguments, around a transformers model routed by an attached Grouter."""
    model = attached(seed)
    train_attached(torch.nn.parallel.DistributedDataParallel(model), seed, rank, world)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fsdp_attached(seed, rank, world, bf16=False):
    """FSDP2 as transformers users apply it (each decoder layer, then the root; mean reduction)
    around a Qwen3-MoE routed by an attached Grouter; bf16: with a bf16 MixedPrecisionPolicy."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = attached(seed)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    train_attached(model, seed, rank, world)
    return cases.full_state(model)


def main(out_dir: str, seed: int, names):
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=90))
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = mesh_for(world)
    out = Path(out_dir)
    for name in names:
        result = {}
        if name in cases.TRAINING:
            model = expert_parallel(cases.build_case(name, seed), mesh, blocks=name == "sgd")  # sgd: blocks + root
            result["history"] = cases.train_case(model, name, seed, world, rank, global_mean)
            result["state"], result["grads"] = cases.full_state(model), model.first_grads
            if name == "sigmoid":
                result["bias"] = model.moe.router.expert_bias.clone()
        elif name == "dp_softmax":  # data parallelism alone (FSDP2, summing), the router's terms as shares
            from torch.distributed.fsdp import fully_shard

            model = cases.build_case("softmax_aux", seed)
            model.moe.router.aux_loss_group = "world"
            fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
            model.set_gradient_divide_factor(1.0)
            model.set_force_sum_reduction_for_comms(True)
            result["history"] = cases.train_case(model, "softmax_aux", seed, world, rank, global_mean)
            result["state"], result["grads"] = cases.full_state(model), model.first_grads
        elif name == "global_aux":
            from grouter.nn import SoftmaxTopKRouter

            torch.manual_seed(seed)
            router = SoftmaxTopKRouter(cases.H, cases.E, cases.K, aux_loss_group="world")
            x = cases.batch(seed, 0)[0][cases.rank_slice(world, rank)]
            router(x)
            result["aux"], result["z"] = router.aux_loss.detach(), router.z_loss.detach()
        elif name == "ddp_around_ep":
            model = cases.build(seed)
            model.moe = ExpertParallelMoE(model.moe, mesh=mesh)
            try:
                torch.nn.parallel.DistributedDataParallel(model)
                result["error"] = None
            except RuntimeError as e:
                result["error"] = str(e)
        elif name == "ddp_attached":
            result["state"] = ddp_attached(seed, rank, world)
        elif name in ("fsdp_attached", "fsdp_attached_bf16"):
            result["state"] = fsdp_attached(seed, rank, world, bf16=name.endswith("bf16"))
        elif name == "dcp_save":
            model = expert_parallel(cases.build(seed), mesh)
            cases.train(model, "sgd", seed, world, rank, global_mean)
            dcp.save(model.state_dict(), checkpoint_id=str(out / "ckpt"))
            result["state"] = cases.full_state(model)
        elif name == "dcp_load":
            model = expert_parallel(cases.build(seed + 1), mesh)  # other weights, overwritten by the load
            state = model.state_dict()
            dcp.load(state, checkpoint_id=str(out / "ckpt"))
            model.load_state_dict(state)
            result["state"] = cases.full_state(model)
        torch.save(result, out / f"{name}.{world}.{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
