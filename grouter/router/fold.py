"""Expert folding (fewer target experts) and expanding (more), by co-activation affinity.

affinity: P_ij = tokens routed to both i and j / tokens, diagonal 0 (compiled `coactivation`).
fold_groups: the paper's greedy balanced grouping: group sizes floor(E_S/n), E_S mod n of them
    one larger; each group is seeded with the unassigned expert of largest total affinity, then
    repeatedly takes the unassigned expert with the largest summed affinity to the group.
fold: W~ = M^T W (a target logit is the sum of its group's source logits; biases summed).
expand: split the most loaded expert (a copy of its row, both halves' bias lowered by log 2 so
    the pair keeps the original's probability mass, a little noise to break ties) until there are
    n experts; `tune` then separates the copies and balances the load.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable, Optional, Tuple

import torch
from torch import Tensor

from .. import ops
from .model import Grouter

from ..nn.grouping import fold_groups

__all__ = ["affinity", "coactivation_counts", "fold_groups", "fold", "expand"]


@torch.no_grad()
def coactivation_counts(g: Grouter, batches: Iterable[Tensor]) -> Tuple[Tensor, int]:
    """(int64 [E, E] co-activation counts of g's top-k routes, number of tokens)."""
    E = g.num_experts
    counts = torch.zeros(E, E, dtype=torch.int64)
    tokens = 0
    for batch in batches:
        ids, _ = g.route(batch.to(next(g.parameters()).device))
        ids = ids.reshape(-1, ids.shape[-1])
        counts += ops.coactivation(ids, E).cpu()
        tokens += ids.shape[0]
    return counts, tokens


def affinity(g: Grouter, batches: Iterable[Tensor]) -> Tensor:
    """float [E, E] co-activation affinity of g's routes: pair counts / tokens, diagonal 0."""
    counts, tokens = coactivation_counts(g, batches)
    A = counts.double() / max(tokens, 1)
    A.fill_diagonal_(0)
    return A.float()


def _check_groups(groups: Tensor, E: int) -> Tuple[Tensor, int]:
    groups = torch.as_tensor(groups, dtype=torch.long).cpu()
    if groups.shape != (E,):
        raise ValueError(f"groups must have one entry per source expert ({E}), got shape {tuple(groups.shape)}")
    n = int(groups.max()) + 1 if E else 0
    if groups.min() < 0 or set(groups.tolist()) != set(range(n)):
        raise ValueError("groups must use every target id 0..n-1 and no other")
    return groups, n


@torch.no_grad()
def fold(g: Grouter, groups: Tensor, top_k: Optional[int] = None) -> Grouter:
    """A new Grouter with n outputs; target logit j = sum of the logits of source experts in group j."""
    groups, n = _check_groups(groups, g.num_experts)
    if top_k is None and g.top_k > n:
        warnings.warn(f"fold: {n} experts are fewer than top_k={g.top_k}; the folded Grouter routes to {n} "
                      "(pass top_k to choose)", stacklevel=2)
    config = dict(g.config, num_experts=n, top_k=min(g.top_k, n) if top_k is None else top_k,
                  source=f"fold of {g.config.get('source') or 'a Grouter'} ({g.num_experts} -> {n} experts)",
                  expert_order=None)  # new experts: a numbering of their own
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the bidirectional warning was given for the source already
        folded = Grouter(**config).to(g.proj.weight.device)
    state = {k: v for k, v in g.state_dict().items() if not k.startswith("proj.")}
    folded.load_state_dict(state, strict=False)
    M = torch.zeros(g.num_experts, n, dtype=g.proj.weight.dtype, device=g.proj.weight.device)
    M[torch.arange(g.num_experts), groups.to(M.device)] = 1
    folded.proj.weight.copy_(M.T @ g.proj.weight)
    if g.proj.bias is not None:
        folded.proj.bias.copy_(M.T @ g.proj.bias)
    return folded


@torch.no_grad()
def expand(g: Grouter, n: int, batches: Iterable[Tensor], noise: float = 1e-3, seed: int = 0) -> Grouter:
    """A Grouter with n >= E experts, made by splitting the most loaded experts; tune it afterwards.

    A split expert's two copies share its projection row (plus a little noise). Under softmax
    scores both biases drop by log 2, so the pair keeps the original expert's probability mass;
    under sigmoid scores no constant shift does that for every input, so the copies keep the
    original logit (each scores as the original did) and tuning separates them.
    """
    E = g.num_experts
    if n < E:
        raise ValueError(f"expand grows the expert count; {n} < {E} (use fold)")
    counts, _ = coactivation_counts(g, batches)
    load = counts.diagonal().double().tolist()
    weight = g.proj.weight.detach().clone()
    bias = g.proj.bias.detach().clone() if g.proj.bias is not None else torch.zeros(E, device=weight.device)
    gen = torch.Generator().manual_seed(seed)
    while weight.shape[0] < n:
        i = max(range(len(load)), key=lambda j: (load[j], -j))
        load[i] /= 2
        load.append(load[i])
        if g.score == "softmax":
            bias[i] -= math.log(2)  # the two halves together keep the original expert's softmax mass
        row = weight[i] + noise * weight[i].abs().mean() * torch.randn(weight.shape[1], generator=gen).to(weight)
        weight = torch.cat([weight, row[None]])
        bias = torch.cat([bias, bias[i:i + 1]])
    config = dict(g.config, num_experts=n, bias=True,
                  source=f"expansion of {g.config.get('source') or 'a Grouter'} ({E} -> {n} experts)",
                  expert_order=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grown = Grouter(**config).to(weight.device)
    grown.load_state_dict({k: v for k, v in g.state_dict().items() if not k.startswith("proj.")}, strict=False)
    grown.proj.weight.copy_(weight)
    grown.proj.bias.copy_(bias)
    return grown

