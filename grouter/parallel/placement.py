"""Where experts and samples live in expert parallelism, chosen from routes known ahead.

A placement is a LongTensor [world_size, E / world_size]: row r lists the global ids of the
experts rank r hosts (every expert exactly once, equal counts). A token-expert pair "crosses"
when the rank holding the token's sample does not host the expert: its activations travel both
ways through the all-to-all. Two levers cut crossings:

place_experts: experts often co-activated share a rank, so a token's K experts tend to sit
    together (the paper's greedy balanced grouping by affinity, then pairwise swaps while they
    raise the affinity kept inside ranks).
assign_samples: each sequence goes to the rank hosting most of its pairs, within a per-rank
    capacity (greedy by regret: samples that lose most by not getting their best rank go first).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from ..nn.grouping import fold_groups

__all__ = ["contiguous_placement", "check_placement", "slots", "place_experts", "assign_samples",
           "relabel_experts", "renumber_experts",
           "contiguous_sample_ranks", "routes_by_rank", "pairs_per_rank", "cross_rank_fraction"]

PlacementLike = Union[Tensor, Sequence[Sequence[int]]]


def contiguous_placement(num_experts: int, world_size: int) -> Tensor:
    """Rank r hosts experts r*E/W .. (r+1)*E/W - 1: what expert parallelism does without routes."""
    _check_divides(num_experts, world_size)
    return torch.arange(num_experts).view(world_size, num_experts // world_size)


def _check_divides(num_experts: int, world_size: int) -> None:
    if world_size < 1 or num_experts < 1 or num_experts % world_size:
        raise ValueError(f"{num_experts} experts cannot be spread evenly over {world_size} ranks "
                         f"(expert parallelism needs num_experts % world_size == 0)")


def check_placement(placement: PlacementLike, num_experts: int, world_size: int) -> Tensor:
    """The placement as a LongTensor [W, E/W]; raises ValueError unless it hosts each expert once."""
    _check_divides(num_experts, world_size)
    try:
        p = torch.as_tensor(placement)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"placement {placement!r} is not a table [world_size={world_size}, experts per rank="
                         f"{num_experts // world_size}] of expert ids ({e})") from None
    if p.dtype.is_floating_point or p.dtype == torch.bool:
        raise ValueError(f"placement must hold integer expert ids, got {p.dtype}")
    if p.shape != (world_size, num_experts // world_size):
        raise ValueError(f"placement must have shape [world_size={world_size}, experts per rank="
                         f"{num_experts // world_size}], got {tuple(p.shape)}")
    p = p.long().cpu()
    if not torch.equal(p.flatten().sort().values, torch.arange(num_experts)):
        raise ValueError(f"placement must host every expert 0..{num_experts - 1} exactly once")
    return p


def slots(placement: Tensor) -> Tensor:
    """LongTensor [E]: each expert's slot, its position in the flattened placement (rank-major)."""
    slot_of = torch.empty(placement.numel(), dtype=torch.long)
    slot_of[placement.flatten()] = torch.arange(placement.numel())
    return slot_of


def _rank_of(placement: Tensor) -> Tensor:
    """LongTensor [E]: the rank hosting each expert."""
    return slots(placement) // placement.shape[1]


def _intra(A: Tensor, rank_of: Tensor) -> float:
    same = rank_of[:, None] == rank_of[None, :]
    return float(A[same].sum())


def place_experts(affinity: Tensor, world_size: int, refine: bool = True) -> Tensor:
    """LongTensor [W, E/W]: experts with high co-activation affinity share a rank.

    affinity: [E, E] (grouter.affinity or co-activation counts; symmetrised, diagonal ignored).
    Deterministic. refine=False keeps the greedy grouping without the swap pass.
    """
    A = torch.as_tensor(affinity, dtype=torch.float64).cpu()
    if A.dim() != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"affinity must be a square [E, E] matrix, got shape {tuple(A.shape)}")
    E = A.shape[0]
    _check_divides(E, world_size)
    A = (A + A.T) / 2
    A.fill_diagonal_(0)
    rank_of = fold_groups(A, world_size)
    if refine and world_size > 1:
        rank_of = _swap_refine(A, rank_of)
    # Each rank's experts in ascending id; ranks ordered by their smallest expert (deterministic).
    rows = sorted((sorted(torch.nonzero(rank_of == r).flatten().tolist()) for r in range(world_size)))
    return torch.tensor(rows, dtype=torch.long)


def _swap_refine(A: Tensor, rank_of: Tensor, max_rounds: int = 100) -> Tensor:
    """Swap experts between ranks while the best swap raises the affinity kept inside ranks."""
    rank_of = rank_of.clone()
    E = A.shape[0]
    for _ in range(max_rounds):
        # pull[i, r]: affinity of expert i to the experts on rank r.
        pull = torch.zeros(E, int(rank_of.max()) + 1, dtype=A.dtype).index_add_(1, rank_of, A)
        own = pull.gather(1, rank_of[:, None]).squeeze(1)
        # Gain of swapping i and j (on different ranks): each moves to the other's rank.
        gain = (pull[:, rank_of] - own[:, None]) + (pull[:, rank_of].T - own[None, :]) - 2 * A
        gain.masked_fill_(rank_of[:, None] == rank_of[None, :], 0)
        best = int(gain.argmax())
        if float(gain.flatten()[best]) <= 1e-12:
            break
        i, j = divmod(best, E)
        rank_of[i], rank_of[j] = rank_of[j].clone(), rank_of[i].clone()
    return rank_of


def pairs_per_rank(routes: Tensor, placement: PlacementLike) -> Tensor:
    """LongTensor [N, W]: token-expert pairs of each sample whose expert rank r hosts.

    routes: expert ids [N, S, K] (N samples of S tokens) or [N, K] (one token per sample).
    """
    placement = torch.as_tensor(placement)
    E = placement.numel()
    placement = check_placement(placement, E, placement.shape[0])
    routes = torch.as_tensor(routes)
    if routes.dim() == 2:
        routes = routes[:, None, :]
    if routes.dim() != 3:
        raise ValueError(f"routes must be expert ids [N, S, K] or [N, K], got shape {tuple(routes.shape)}")
    ids = routes.reshape(routes.shape[0], routes.shape[1] * routes.shape[2]).long().cpu()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= E):
        raise ValueError(f"routes hold expert ids outside [0, {E}) of the placement")
    W = placement.shape[0]
    rank = _rank_of(placement)[ids]
    counts = torch.zeros(ids.shape[0], W, dtype=torch.long)
    return counts.scatter_add_(1, rank, torch.ones_like(rank))


def assign_samples(routes: Tensor, placement: PlacementLike, capacity: Optional[int] = None) -> Tensor:
    """LongTensor [N]: the rank of each sample, each on the rank hosting most of its pairs.

    capacity: samples per rank (default ceil(N / W)); N <= W * capacity is required.
    Deterministic: greedy by regret (best minus second-best pairs), ties by sample index.
    """
    counts = pairs_per_rank(routes, placement)
    N, W = counts.shape
    if capacity is None:
        capacity = -(-N // W)
    if capacity < 0 or N > W * capacity:
        raise ValueError(f"{N} samples do not fit {W} ranks of capacity {capacity}")
    ranked = counts.sort(dim=1, descending=True, stable=True)
    order_of_ranks = ranked.indices
    regret = ranked.values[:, 0] - (ranked.values[:, 1] if W > 1 else 0)
    order = sorted(range(N), key=lambda i: (-int(regret[i]), i))
    room = [capacity] * W
    out = torch.empty(N, dtype=torch.long)
    prefs = order_of_ranks.tolist()
    for i in order:
        r = next(r for r in prefs[i] if room[r] > 0)
        out[i] = r
        room[r] -= 1
    return out


def contiguous_sample_ranks(num_samples: int, world_size: int) -> Tensor:
    """LongTensor [N]: samples in data order, in equal contiguous blocks (sample i on rank i*W//N),
    what a plain distributed sampler does."""
    return torch.arange(num_samples) * world_size // max(num_samples, 1)


def cross_rank_fraction(routes: Tensor, placement: PlacementLike, sample_ranks: Optional[Tensor] = None) -> float:
    """Fraction of token-expert pairs whose expert lives on another rank than their sample.

    sample_ranks [N]: the rank of each sample; default: contiguous_sample_ranks(N, W).
    """
    counts = pairs_per_rank(routes, placement)
    N, W = counts.shape
    if sample_ranks is None:
        sample_ranks = contiguous_sample_ranks(N, W)
    sample_ranks = torch.as_tensor(sample_ranks, dtype=torch.long).cpu()
    if sample_ranks.shape != (N,) or (N and (int(sample_ranks.min()) < 0 or int(sample_ranks.max()) >= W)):
        raise ValueError(f"sample_ranks must be [N={N}] ranks in [0, {W})")
    total = int(counts.sum())
    if total == 0:
        return 0.0
    local = int(counts.gather(1, sample_ranks[:, None]).sum())
    return 1.0 - local / total


def routes_by_rank(expert_ids: Tensor, sample_ranks: Tensor, world_size: int) -> List[Tensor]:
    """Every rank's routes [tokens, K] (its samples in ascending order), from the global batch's
    routes [N, S, K] and each sample's rank: the `global_expert_ids` of ParallelRouting.prepare."""
    ids = torch.as_tensor(expert_ids)
    ranks = torch.as_tensor(sample_ranks, device=ids.device)
    if ids.dim() != 3 or ranks.shape != ids.shape[:1]:
        raise ValueError(f"need expert ids [N, S, K] and sample ranks [N], got {tuple(ids.shape)} and "
                         f"{tuple(ranks.shape)}")
    return [ids[ranks == r].reshape(-1, ids.shape[-1]) for r in range(world_size)]


def check_expert_order(order: Optional[Sequence[int]], num_experts: int) -> Tensor:
    """An experts' numbering as a LongTensor [E] (None: 0..E-1); ValueError unless a permutation."""
    if order is None:
        return torch.arange(num_experts)
    t = torch.as_tensor(order)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.shape != (num_experts,) or \
            not torch.equal(t.long().sort().values.cpu(), torch.arange(num_experts)):
        raise ValueError(f"expert_order must be a permutation of 0..{num_experts - 1}, got {short_ids(t)}")
    return t.long().cpu()


def short_ids(t) -> str:
    """Ids for a message: all of them up to 16, else the first 16 and the count."""
    values = torch.as_tensor(t).flatten().tolist()
    return str(values) if len(values) <= 16 else f"[{', '.join(map(str, values[:16]))}, ... ({len(values)} ids)]"


def relabel_experts(grouter, placement: PlacementLike):
    """(a copy of the Grouter with its experts renumbered in placement order, the contiguous placement).

    Expert `placement.flatten()[s]` becomes expert s (the rows of the output projection are
    reordered; routes and weights are otherwise unchanged), so rank r's experts are consecutive.
    A new model trained on the relabelled Grouter with the contiguous placement exchanges exactly
    the rows it would have with `placement`, and its expert-parallel state_dict lists the experts in
    its own order: what checkpoints (DCP) need. The copy's `expert_order` records the numbering;
    pass it to ExpertParallelMoE(expert_order=...), which saves it with the checkpoint. Do it
    before training: a model already trained on the old ids would need its expert weights permuted
    too. To resume elsewhere, `renumber_experts(grouter, checkpoint's expert_order)`.
    """
    E = grouter.num_experts
    world = torch.as_tensor(placement).shape[0]
    order = check_placement(placement, E, world).flatten()
    return _reordered(grouter, order), contiguous_placement(E, world)


def renumber_experts(grouter, expert_order: Sequence[int]):
    """A copy of the Grouter whose `expert_order` is the one given: e.g. a checkpoint's, so that
    training resumes on any number of ranks with the experts the checkpoint's rows belong to
    (with the contiguous placement of that numbering)."""
    E = grouter.num_experts
    want = check_expert_order(expert_order, E)
    position = torch.empty(E, dtype=torch.long)
    position[grouter.expert_order] = torch.arange(E)  # where each original expert is now
    return _reordered(grouter, position[want])


def _reordered(grouter, order: Tensor):
    """A copy whose expert s is the Grouter's expert order[s]."""
    import copy

    relabelled = copy.deepcopy(grouter)
    with torch.no_grad():
        relabelled.proj.weight.copy_(grouter.proj.weight[order.to(grouter.proj.weight.device)])
        if grouter.proj.bias is not None:
            relabelled.proj.bias.copy_(grouter.proj.bias[order.to(grouter.proj.bias.device)])
    relabelled.config["expert_order"] = grouter.expert_order[order].tolist()
    return relabelled
