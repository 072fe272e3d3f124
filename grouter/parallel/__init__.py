"""Expert parallelism on torch.distributed (gloo on CPU, NCCL on GPU), with routes known ahead.

ExpertParallelMoE spreads a grouter.nn.MoE's experts over a process group; ParallelRouting plans
a step's all-to-all once for every layer (no count exchange when the global batch's routes are
known, e.g. pre-dispatched); place_experts / assign_samples put co-activated experts, and the
samples that use them, on the same rank.
"""

from .dispatch import CommStats, ParallelRouting, all_to_all, comm_stats, reset_comm_stats
from .moe import ExpertParallelMoE
from .data_parallel import expert_parallel_layers, fully_shard_dense, global_mean
from .placement import (assign_samples, check_placement, contiguous_placement, contiguous_sample_ranks,
                        cross_rank_fraction, pairs_per_rank, place_experts, relabel_experts, renumber_experts,
                        routes_by_rank)

__all__ = [
    "ExpertParallelMoE", "ParallelRouting", "all_to_all", "CommStats", "comm_stats", "reset_comm_stats",
    "place_experts", "assign_samples", "contiguous_sample_ranks", "routes_by_rank", "contiguous_placement", "check_placement", "pairs_per_rank",
    "cross_rank_fraction", "fully_shard_dense", "relabel_experts", "renumber_experts", "global_mean", "expert_parallel_layers",
]
