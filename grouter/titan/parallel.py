"""Expert parallelism of a converted torchtitan model on a mesh you built (gloo or NCCL).

torchtitan's own path (``parallelize_qwen3`` & co. with ``ParallelDims``) builds its meshes on the
accelerator it finds; `expert_parallel` does its expert-parallel part on any 1-D ``"ep"`` mesh:
each MoE layer's experts become DTensors sharded on the expert dimension (``Shard(0)``, what
torchtitan's EP sharding gives them; its experts and grouter's both compute on the local shard) and
its dispatcher is wired to the mesh as ``RoutedExperts.parallelize`` wires it. Everything else
(dense weights, data parallelism, the loss) stays yours: with a loss summed over this rank's tokens
and divided by the global batch's, all-reduce the dense gradients (sum) and the experts' are already
the one-process ones.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from .convert import moe_layers
from .modules import GrouterTokenDispatcher, check_spmd_backend
from .routes import routes_of

__all__ = ["expert_parallel"]


def expert_parallel(model: nn.Module, ep_mesh) -> nn.Module:
    """Shard every converted MoE layer's experts over `ep_mesh` (1-D) and wire its dispatcher. In place."""
    routes = routes_of(model)
    if ep_mesh.ndim != 1:
        raise ValueError(f"grouter.titan.expert_parallel: a 1-D expert-parallel mesh, got {ep_mesh.ndim} dimensions")
    world = ep_mesh.size()
    if routes.num_experts % world:
        raise ValueError(f"grouter.titan.expert_parallel: {routes.num_experts} experts do not divide over "
                         f"{world} ranks")
    check_spmd_backend()
    for name, moe in moe_layers(model):
        dispatcher = moe.routed_experts.token_dispatcher
        if not isinstance(dispatcher, GrouterTokenDispatcher):
            raise ValueError(f"grouter.titan.expert_parallel: {name} is not converted (grouter.titan.convert first)")
        inner = moe.routed_experts.inner_experts
        for pname in ("w1_EFD", "w2_EDF", "w3_EFD"):
            p = getattr(inner, pname)
            if isinstance(p, DTensor):
                raise ValueError(f"grouter.titan.expert_parallel: {name}'s experts are already distributed")
            setattr(inner, pname, nn.Parameter(distribute_tensor(p.detach(), ep_mesh, [Shard(0)]),
                                               requires_grad=p.requires_grad))
        dispatcher.wire_meshes(ep_mesh=ep_mesh)
    return model
