"""Data parallelism around expert-parallel layers: FSDP2 on the dense parts, experts left to EP.

The gradient convention (the one `ExpertParallelMoE` follows): each rank's loss is its share of the
global batch's mean, its tokens' summed loss divided by the global token count (`global_mean`), and
every gradient is the sum over ranks. With uneven token splits that is the only scaling that equals
one process on the whole batch: averaging per-rank means weighs a rank's tokens by 1/its count.
"""

from __future__ import annotations

from typing import Iterable, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from .moe import ExpertParallelMoE

__all__ = ["global_mean", "expert_parallel_layers", "fully_shard_dense"]


def global_mean(loss_sum: Tensor, num_tokens: int, group: Optional[dist.ProcessGroup] = None) -> Tensor:
    """This rank's share of the global batch's mean loss: loss_sum / (num_tokens summed over `group`,
    default every rank). Summing these shares' gradients over the ranks gives the gradient of the
    mean over the global batch."""
    count = torch.tensor(float(num_tokens), dtype=torch.float64, device=loss_sum.device)
    if dist.is_initialized():
        dist.all_reduce(count, group=group)
    if count.item() == 0:
        raise ValueError("global_mean: the global batch has no tokens")
    return loss_sum / count.to(loss_sum.dtype)


def expert_parallel_layers(model: nn.Module) -> List[ExpertParallelMoE]:
    return [m for m in model.modules() if isinstance(m, ExpertParallelMoE)]


def fully_shard_dense(model: nn.Module, mesh: Optional[DeviceMesh] = None, blocks: Iterable[nn.Module] = (),
                      **fsdp_kwargs) -> nn.Module:
    """Apply FSDP2 (`fully_shard`) to everything of the model but its experts, on the mesh its
    ExpertParallelMoE layers use: a 1-D expert-parallel mesh shards the dense weights over the
    same ranks; a ("dp", "ep") mesh shards them over "ep" and replicates over "dp" (HSDP). Each of
    `blocks` (e.g. the transformer blocks) becomes its own FSDP unit first, then the root. Gradients
    are summed, not averaged (see `global_mean`). `mp_policy` (a MixedPrecisionPolicy) applies to
    the experts too: they compute in its param_dtype from their fp32 parameters, and their
    gradients are summed over "dp" in its reduce_dtype. Returns the model (now an FSDPModule).

    `fully_shard(model)` itself cannot work on such a model: FSDP2 would try to shard the experts,
    already DTensors on this mesh, again (it raises)."""
    from torch.distributed.fsdp import fully_shard

    layers = expert_parallel_layers(model)
    if not layers:
        raise ValueError("fully_shard_dense: the model has no ExpertParallelMoE layer (use fully_shard itself)")
    mesh = layers[0].mesh if mesh is None else mesh
    if any(layer.mesh != mesh for layer in layers):
        raise ValueError("fully_shard_dense: every ExpertParallelMoE must use the mesh given (the same DeviceMesh)")
    if any(not layer.in_rank_order for layer in layers):
        raise ValueError(f"fully_shard_dense: the mesh {mesh.mesh.tolist()} lists ranks out of order; FSDP2 shards "
                         f"by rank in the process group while torch.distributed.checkpoint places shards by mesh "
                         f"coordinate, so its checkpoints would hold the dense weights at the wrong offsets (torch "
                         f"2.13). Build the mesh in rank order (init_device_mesh)")
    for layer in layers:
        layer.mixed_precision = fsdp_kwargs.get("mp_policy")
    experts = {p for layer in layers for p in layer.experts.parameters()} | set(fsdp_kwargs.pop("ignored_params", ()))
    units = [*blocks, model]
    for unit in units:
        fully_shard(unit, mesh=mesh, ignored_params=experts & set(unit.parameters()), **fsdp_kwargs)
    for unit in units:
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no pre-multiplied sum
    return model
