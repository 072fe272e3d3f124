"""One rank of the torchtitan expert-parallel test: `python ep_worker.py ROUTES OUT MODE STEPS BATCH`.

A tiny torchtitan Qwen3-MoE converted to grouter and made expert-parallel by
grouter.titan.expert_parallel (experts sharded as DTensors, Shard(0) on an "ep" mesh; dispatchers
wired to it as torchtitan's RoutedExperts.parallelize does); routes from a PredispatchedDataset through torchtitan's dataloader.
MODE: "known" (every rank's counts come with the batch: no count exchange), "exchange" (one
all-gather of counts per step) or "stock" (torchtitan's AllToAllTokenDispatcher: a count all-to-all
and a device-to-host sync in every layer). Dense gradients are all-reduced (data parallel), the loss
is the global mean. Saves losses, parameters and what each step sent.
"""

import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torchtitan.components.dataloader import ParallelAwareDataloader  # noqa: E402
from torchtitan.distributed.utils import set_spmd_backend  # noqa: E402
from torchtitan.models.common.token_dispatcher import AllToAllTokenDispatcher  # noqa: E402

import grouter  # noqa: E402
import grouter.titan as gt  # noqa: E402
from titan_models import E, K, build, lm_loss, small_grouter  # noqa: E402


class CountOps(TorchDispatchMode):
    """Collective ops this rank issued (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        ns = func.namespace
        if ns in ("c10d", "_c10d_functional", "_c10d_functional_autograd"):
            self.ops[func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


SYNCS = Counter()
_stock_sync = AllToAllTokenDispatcher._sync_token_count_exchange


def _counting_sync(self, *args):
    SYNCS["stock"] += 1  # torchtitan: "this would incur a device-to-host sync"
    return _stock_sync(self, *args)


def main(routes_dir, out_dir, mode, steps, batch):
    steps, batch = int(steps), int(batch)
    set_spmd_backend("partial_dtensor")  # parallelism.spmd_backend: DTensor on the model-parallel axes
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    g = small_grouter()
    model = gt.expert_parallel(gt.convert(build(), None), mesh)
    if mode == "stock":
        for _, moe in gt.moe_layers(model):
            moe.routed_experts.token_dispatcher = AllToAllTokenDispatcher(
                AllToAllTokenDispatcher.Config(num_experts=E, top_k=K))
            moe.routed_experts.token_dispatcher.wire_meshes(ep_mesh=mesh)
        model.grouter_routes.dispatchers = []  # torchtitan's own: the step computes no splits
    AllToAllTokenDispatcher._sync_token_count_exchange = _counting_sync
    reader = grouter.PredispatchReader(routes_dir, g)
    dataset = gt.PredispatchedDataset(reader, rank=rank, world_size=world, counts_by_rank=(mode == "known"))
    loader = ParallelAwareDataloader(dataset, dp_rank=rank, dp_world_size=world, batch_size=batch,
                                     collate_fn=gt.PredispatchedDataset.collate)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses, per_step = [], []
    for step, (input_dict, labels) in zip(range(steps), loader):
        counter = CountOps()
        exchanges, syncs = model.grouter_routes.count_exchanges, SYNCS["stock"]
        with counter:
            inputs = input_dict.pop("input")
            logits = model(inputs, **input_dict)
            # The global mean: this rank's sum over the global batch's token count.
            loss = lm_loss(logits, labels) * labels.numel() / (labels.numel() * world)
            opt.zero_grad()
            loss.backward()
            for p in model.parameters():
                if not isinstance(p, DTensor):
                    dist.all_reduce(p.grad)
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total)
        per_step.append(dict(ops=dict(counter.ops),
                             host_syncs=SYNCS["stock"] - syncs + model.grouter_routes.count_exchanges - exchanges))
    params = {n: (p.to_local() if isinstance(p, DTensor) else p).detach() for n, p in model.named_parameters()}
    torch.save(dict(losses=losses, params=params, per_step=per_step, world=world),
               Path(out_dir) / f"ep.{mode}.{rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
