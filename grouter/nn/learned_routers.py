"""Learned routers, the baselines a fixed Grouter is compared with.

- `SoftmaxTopKRouter`: softmax over a linear gate, top-k, optional renormalisation of the k
  weights; exposes the Switch/GShard load-balancing loss and the router z-loss of its last
  forward as `aux_loss` and `z_loss` for the training loop to add.
- `SigmoidTopKRouter`: DeepSeek-V3 style sigmoid scores; an expert bias (not learned by
  gradient) shifts which experts are chosen but not their weights: auxiliary-loss-free balancing.
  Training forwards only count each expert's load; `update_bias()` (or `update_router_biases(model)`)
  moves the bias once per step, after the optimizer step, from the load summed over the data-parallel
  ranks. Outside forward, so an activation-checkpoint recompute routes exactly as its forward did.

Both take tokens [T, H] and return (expert_ids [T, K] int64, weights [T, K]).

Data or expert parallelism: the softmax router's aux loss balances this rank's tokens by default
(one process: the batch). With `aux_loss_group` set (a process group, "world", or a DeviceMesh:
all its ranks; an ExpertParallelMoE sets its own mesh) the group's ranks together hold the global
batch, and `aux_loss` and `z_loss` are this rank's *shares* of the global batch's terms: they sum
over the ranks to what one process computes on the whole batch, so `global_mean(loss_sum, n) +
coef * aux_loss + coef_z * z_loss`, with gradients summed over the ranks (FSDP2 with sum
reduction, as `fully_shard_dense` sets it), is the one-process gradient. A rank without tokens
contributes 0.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh


__all__ = ["SoftmaxTopKRouter", "SigmoidTopKRouter", "load_balancing_loss", "router_z_loss", "update_router_biases"]


def _expert_counts(expert_ids: Tensor, num_experts: int) -> Tensor:
    # scatter_add, not bincount: a fixed output shape, which torch.compile traces without a break.
    ids = expert_ids.reshape(-1)
    return ids.new_zeros(num_experts).scatter_add_(0, ids, torch.ones_like(ids))


def _summed(counts: Tensor, group: Any) -> Tensor:
    """counts summed, in place, over a process group ("world" = the default group; a DeviceMesh =
    all its ranks; None = this rank's own). Callers pass counts they own and discard."""
    if group is None or not dist.is_initialized():
        return counts
    if isinstance(group, DeviceMesh):
        for dim in range(group.ndim):  # summed along each dimension in turn: over the whole mesh
            dist.all_reduce(counts, group=group.get_group(dim))
    else:
        dist.all_reduce(counts, group=None if group == "world" else group)
    return counts


def load_balancing_loss(probs: Tensor, expert_ids: Tensor, num_experts: int, group: Any = None) -> Tensor:
    """Switch/GShard auxiliary loss E * sum_i f_i * P_i (1 when perfectly balanced).

    f_i: fraction of the T*K routed slots that went to expert i; P_i: mean router probability of i.
    With `group` (see the module's notes) both are the global batch's and the value is this
    rank's share, E * sum_i f_i * (its tokens' summed probabilities of i) / global tokens.
    """
    return _balance_and_z(probs, None, expert_ids, num_experts, group)[0]


def router_z_loss(logits: Tensor, expert_ids: Optional[Tensor] = None, group: Any = None) -> Tensor:
    """ST-MoE's z-loss: mean squared log-partition, keeps router logits small (0 without tokens).
    With `group` (and the tokens' expert_ids, which count the global tokens) this rank's share of
    the global batch's mean."""
    if group is not None and expert_ids is None:
        raise ValueError("router_z_loss with a group needs the tokens' expert_ids (they count the global tokens)")
    ids = expert_ids if expert_ids is not None else logits.new_zeros((logits.shape[0], 1), dtype=torch.long)
    return _balance_and_z(None, logits, ids, logits.shape[-1], group)[1]


def _balance_and_z(probs: Optional[Tensor], logits: Optional[Tensor], expert_ids: Tensor, num_experts: int,
                   group: Any) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """(aux, z) from one count of the slots per expert (one all-reduce with a group)."""
    ids = expert_ids.reshape(-1, expert_ids.shape[-1])
    counts = _summed(_expert_counts(ids, num_experts), group)
    T = ids.shape[0]
    aux = z = None
    if group is None:  # this batch alone: the means (0 without tokens, not an empty mean's NaN)
        if probs is not None:
            f = counts.to(probs.dtype) / counts.sum().clamp(min=1)
            aux = num_experts * (f * probs.mean(0)).sum() if T else probs.sum() * 0
        if logits is not None:
            z = torch.logsumexp(logits, dim=-1).square().mean() if T else logits.sum() * 0
        return aux, z
    # Every token has K distinct experts: the global token count is the slots' sum / K. Sums over
    # this rank's tokens divided by global counts: its share, 0 for a rank without tokens.
    slots = counts.sum().double()
    tokens = (slots / max(ids.shape[1], 1)).clamp(min=1)
    if probs is not None:
        f = (counts.double() / slots.clamp(min=1)).to(probs.dtype)
        aux = num_experts * (f * probs.sum(0)).sum() / tokens.to(probs.dtype)
    if logits is not None:
        z = torch.logsumexp(logits, dim=-1).square().sum() / tokens.to(logits.dtype)
    return aux, z


class SoftmaxTopKRouter(nn.Module):
    """A learned top-k router: softmax over expert logits, the top k (renormalised by default).

    forward(tokens [T, H]) -> (expert_ids [T, K], weights [T, K]); keeps `logits`, the Switch/GShard
    `aux_loss` and the ST-MoE `z_loss` of that call for the training loss.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, renormalize: bool = True,
                 aux_loss_group: Any = None, device=None, dtype=None):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.aux_loss_group = aux_loss_group  # None: this rank's batch; a group or "world": the global batch
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, device=device, dtype=dtype))
        nn.init.normal_(self.weight, std=0.02)
        self.aux_loss: Optional[Tensor] = None
        self.z_loss: Optional[Tensor] = None
        self.logits: Optional[Tensor] = None  # of the last forward (grouter.distill reads them)
        self.last_ids: Optional[Tensor] = None

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        logits = F.linear(x, self.weight).float()
        self.logits = logits
        probs = logits.softmax(dim=-1)
        weights, ids = probs.topk(self.top_k, dim=-1)
        self.last_ids = ids
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        self.aux_loss, self.z_loss = _balance_and_z(probs, logits, ids, self.num_experts, self.aux_loss_group)
        return ids, weights.to(x.dtype)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}, renormalize={self.renormalize}"


class SigmoidTopKRouter(nn.Module):
    """DeepSeek-V3's aux-loss-free router: sigmoid scores, top k chosen with a per-expert bias.

    The bias (a buffer) is not learned by gradient: training forwards add each expert's routed
    slots to `expert_load`, and `update_bias()`, called once per step after the optimizer step,
    moves the bias by `bias_update_rate` towards equal load (sign rule) and clears the count.
    Weights are the chosen experts' unbiased scores, normalised, times `scaling`.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, bias_update_rate: float = 1e-3,
                 scaling: float = 1.0, device=None, dtype=None):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.num_experts, self.top_k = num_experts, top_k
        self.bias_update_rate, self.scaling = bias_update_rate, scaling
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, device=device, dtype=dtype))
        nn.init.normal_(self.weight, std=0.02)
        self.register_buffer("expert_bias", torch.zeros(num_experts, device=device))
        # Slots routed to each expert since the last update_bias (this rank's training forwards).
        self.register_buffer("expert_load", torch.zeros(num_experts, device=device), persistent=False)
        self.aux_loss: Optional[Tensor] = None  # none: balance comes from the bias
        self.z_loss: Optional[Tensor] = None
        self.logits: Optional[Tensor] = None
        self.last_ids: Optional[Tensor] = None

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        self.logits = F.linear(x, self.weight).float()
        scores = self.logits.sigmoid()
        ids = (scores + self.expert_bias).topk(self.top_k, dim=-1).indices  # the bias picks, not weighs
        self.last_ids = ids
        weights = scores.gather(1, ids)
        weights = self.scaling * weights / weights.sum(dim=-1, keepdim=True)
        # Count in training forwards, but not in an activation-checkpoint recompute (it runs inside
        # the backward pass): that forward was counted already.
        recomputing = not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1
        if self.training and not recomputing:
            with torch.no_grad():
                self.expert_load += _expert_counts(ids, self.num_experts)
        return ids, weights.to(x.dtype)

    @torch.no_grad()
    def update_bias(self, group: Any = "world") -> None:
        """Move the bias towards equal load, from the load counted since the last call (summed over
        `group`: "world" = every rank when torch.distributed is initialised, a process group, or
        None for this rank alone), then clear the count. Call once per step, after optimizer.step()."""
        load = _summed(self.expert_load, group)
        if self.bias_update_rate > 0 and load.sum() > 0:
            self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)
        self.expert_load.zero_()

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}, bias_update_rate={self.bias_update_rate}"


def update_router_biases(model: nn.Module, group: Any = "world") -> int:
    """`update_bias(group)` on every SigmoidTopKRouter of the model; returns how many there were.
    Call after each optimizer step; every rank of `group` must call it (an all-reduce)."""
    routers = [m for m in model.modules() if isinstance(m, SigmoidTopKRouter)]
    for router in routers:
        router.update_bias(group)
    return len(routers)
