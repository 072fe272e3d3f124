"""Balanced grouping of experts by co-activation affinity (the paper's expert folding).

In grouter.nn, the lowest layer that uses it: the Grouter folds its experts with it
(grouter.router.fold) and expert parallelism places experts on ranks with it (grouter.parallel).
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

__all__ = ["fold_groups"]


def _group_sizes(E: int, n: int) -> list:
    if not 1 <= n <= E:
        raise ValueError(f"cannot fold {E} experts into {n} groups (need 1 <= n <= {E})")
    return [E // n + (1 if j < E % n else 0) for j in range(n)]


def fold_groups(A: Tensor, n: int, strategy: str = "affinity", load: Optional[Tensor] = None,
                seed: int = 0) -> Tensor:
    """LongTensor [E_S]: the target expert (group) of each source expert; deterministic.

    strategy "affinity" (the paper's greedy grouping), "random" (a seeded random balanced split),
    or "balance" (pairs heavily with lightly loaded experts; `load` [E_S] defaults to A's row sums).
    Group j holds ⌊E_S/n⌋ experts, one more for the first E_S mod n groups.
    """
    A = torch.as_tensor(A, dtype=torch.float64).cpu()
    if A.dim() != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"A must be a square [E, E] matrix, got shape {tuple(A.shape)}")
    sizes = _group_sizes(A.shape[0], n)
    if strategy == "affinity":
        return _affinity_groups(A, sizes)
    if strategy == "random":
        return _random_groups(A.shape[0], sizes, seed)
    if strategy == "balance":
        return _balance_groups(A.sum(1) if load is None else torch.as_tensor(load, dtype=torch.float64).cpu(), sizes)
    raise ValueError(f"strategy must be 'affinity', 'random' or 'balance', got {strategy!r}")


def _affinity_groups(A: Tensor, sizes: List[int]) -> Tensor:
    """The paper's greedy grouping: seed each group with the unassigned expert of largest total
    affinity, then add the unassigned expert with the largest summed affinity to the group."""
    A = (A + A.T) / 2
    A.fill_diagonal_(0)
    groups = torch.full((A.shape[0],), -1, dtype=torch.long)
    unassigned = set(range(A.shape[0]))
    strength = A.sum(1)
    for j, size in enumerate(sizes):
        members = [max(unassigned, key=lambda i: (float(strength[i]), -i))]
        unassigned.remove(members[0])
        while len(members) < size:
            pull = A[:, members].sum(1)
            nxt = max(unassigned, key=lambda i: (float(pull[i]), -i))
            members.append(nxt)
            unassigned.remove(nxt)
        groups[members] = j
    return groups


def _random_groups(E: int, sizes: List[int], seed: int) -> Tensor:
    perm = torch.randperm(E, generator=torch.Generator().manual_seed(seed))
    groups = torch.empty(E, dtype=torch.long)
    bounds = [0] + torch.tensor(sizes).cumsum(0).tolist()
    for j in range(len(sizes)):
        groups[perm[bounds[j]:bounds[j + 1]]] = j
    return groups


def _balance_groups(load: Tensor, sizes: List[int]) -> Tensor:
    """Heaviest expert first, each to the open group with the least load so far."""
    E, n = load.shape[0], len(sizes)
    groups = torch.full((E,), -1, dtype=torch.long)
    totals, filled = [0.0] * n, [0] * n
    for i in sorted(range(E), key=lambda i: (-float(load[i]), i)):
        j = min((j for j in range(n) if filled[j] < sizes[j]), key=lambda j: (totals[j], j))
        groups[i] = j
        totals[j] += float(load[i])
        filled[j] += 1
    return groups
