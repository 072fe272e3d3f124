"""One rank of the FSDP2 test: `python fsdp_worker.py ROUTES CKPT OUT MODE STEPS BATCH`.

torchtitan's large-model flow on a converted model: build on the meta device, convert, fully_shard
every transformer block and the root (FSDP2, gloo, 1-D data-parallel mesh), materialise with
to_empty, load the weights one process saved (CKPT: a DCP checkpoint written through torchtitan's
ModelWrapper, resharded by DCP onto this world size), then train on pre-dispatched routes and save
through DCP again (OUT/trained.MODE).
MODE: "fp32", or "bf16" (MixedPrecisionPolicy: bf16 parameters in compute, fp32 gradient reduction).
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: E402
from torchtitan.components.checkpointer.base import ModelWrapper  # noqa: E402
from torchtitan.components.dataloader import ParallelAwareDataloader  # noqa: E402

import grouter  # noqa: E402
import grouter.titan as gt  # noqa: E402
from titan_models import build, lm_loss, small_grouter  # noqa: E402


def main(routes_dir, ckpt, out_dir, mode, steps, batch):
    steps, batch = int(steps), int(batch)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",))
    model = gt.convert(build(meta=True), None)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mode == "bf16" else \
        MixedPrecisionPolicy()
    for block in model.layers.values():
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    model.to_empty(device="cpu")
    model.init_weights(buffer_device=torch.device("cpu"))  # buffers (RoPE); the weights come from CKPT
    dcp.load({"model": ModelWrapper(model)}, checkpoint_id=ckpt)
    reader = grouter.PredispatchReader(routes_dir, small_grouter())
    loader = ParallelAwareDataloader(gt.PredispatchedDataset(reader, rank=rank, world_size=world), dp_rank=rank,
                                     dp_world_size=world, batch_size=batch)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _, (input_dict, labels) in zip(range(steps), loader):
        inputs = input_dict.pop("input")
        loss = lm_loss(model(inputs, **input_dict), labels)  # FSDP2 averages gradients over the ranks
        opt.zero_grad()
        loss.backward()
        opt.step()
        total = loss.detach().float().clone()
        dist.all_reduce(total)
        losses.append(total / world)
    dcp.save({"model": ModelWrapper(model)}, checkpoint_id=str(Path(out_dir) / f"trained.{mode}"))
    if rank == 0:
        torch.save(dict(losses=losses), Path(out_dir) / f"fsdp.{mode}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
