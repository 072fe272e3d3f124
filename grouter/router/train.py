"""Training a Grouter: distillation from a source MoE's router, and expert tuning for balance.

distill: KL(P || softmax(Grouter logits)) over all experts, no temperature, where P is the teacher
    distribution of the source router at MoE layer `layer` (softmax of its logits for softmax
    routers; its normalised corrected scores within the chosen groups for sigmoid + bias + group-
    limited ones: `grouter.router.source_rule`). Top-k agreement is measured against the experts
    the source block actually chose.
tune: only the final projection W_s learns (method "aux": weight and bias by the sequence-level
    GShard load-balancing loss; "bias": only the bias, by loss-free sign updates towards equal load).
"""

from __future__ import annotations

import itertools
import math
from typing import Dict, Iterable, List, Optional

import torch
from torch import Tensor, nn

from .metrics import max_vio, routed_max_vio
from .model import Grouter
from .teacher import TeacherLogits, teacher_logits

__all__ = ["distill", "tune", "sequence_balance_loss", "batch_balance_loss", "kl_to_source",
           "heldout_metrics"]


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False)


def _cycle(batches: Iterable[Tensor]):
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty")
    return itertools.cycle(batches)


def _kl(target_log_probs: Tensor, logits: Tensor) -> Tensor:
    """Mean over tokens of KL(P || softmax(logits)); P may be 0 (log -inf) outside a source's chosen groups."""
    p = target_log_probs.exp()
    p_log = torch.where(p > 0, target_log_probs, torch.zeros_like(target_log_probs))
    q_log = logits.float().log_softmax(-1)
    return (p * (p_log - q_log)).sum(-1).mean()


def _token_batches(batches, name: str = "batches") -> List[Tensor]:
    """[B, S] token batches (an iterable, read once, or one [N, S] tensor) -> a checked list of int64
    CPU tensors sharing one sequence length."""
    if isinstance(batches, Tensor):
        batches = [batches]
    batches = list(batches) if batches is not None else []
    if not batches:
        raise ValueError(f"{name} is empty")
    for b in batches:
        if not isinstance(b, Tensor) or b.dim() != 2:
            shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
            raise ValueError(f"{name}: each batch must be a [B, S] tensor of token ids, got {shape} "
                             "(cut a 1-D token stream into samples first)")
        if b.dtype.is_floating_point or b.dtype == torch.bool:
            raise ValueError(f"{name}: token ids must be integers, got {b.dtype}")
    if len({b.shape[1] for b in batches}) != 1:
        raise ValueError(f"{name}: batches must share one sequence length, got {sorted({b.shape[1] for b in batches})}")
    return [b.long().cpu() for b in batches]


def _check_vocab(g: Grouter, tokens: Tensor, name: str) -> None:
    if tokens.numel():
        _check_id_range(g, int(tokens.min()), int(tokens.max()), name)


def _check_id_range(g: Grouter, low: int, high: int, name: str) -> None:
    if low < 0 or high >= g.vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"{name}: token id {bad} is outside the Grouter's vocabulary [0, {g.vocab_size})")


def _teacher(source, batches: Optional[List[Tensor]], layer: int, progress: bool) -> TeacherLogits:
    if isinstance(source, TeacherLogits):
        return source
    if not isinstance(source, nn.Module):
        raise TypeError("source must be a torch module (a transformers or grouter MoE model) or TeacherLogits")
    return teacher_logits(source, torch.cat(_token_batches(batches)), layer, progress=progress)


@torch.no_grad()
def heldout_metrics(g: Grouter, teacher: TeacherLogits, batch_size: int = 16) -> Dict[str, float]:
    """On `teacher`'s tokens (held out from training): mean KL(teacher distribution || Grouter) per
    token and top-k agreement: the fraction of the experts the source block chose (k of them, the
    source's k) that are among the Grouter's top k."""
    if teacher.num_experts != g.num_experts:
        raise ValueError(f"the source router has {teacher.num_experts} experts, the Grouter {g.num_experts}")
    device = next(g.parameters()).device
    kl, agree, tokens = 0.0, 0.0, 0
    was_training = g.training
    g.eval()
    for x, target, chosen in teacher.batches(batch_size):
        _check_vocab(g, x, "held-out tokens")
        logits = g(x.to(device)).reshape(-1, g.num_experts).float()
        target = target.reshape(-1, teacher.num_experts).to(device)
        chosen = chosen.reshape(-1, teacher.top_k).to(device)
        n = target.shape[0]
        kl += float(_kl(target, logits)) * n
        mine = logits.topk(teacher.top_k, -1).indices
        agree += float((mine[:, :, None] == chosen[:, None, :]).any(-1).float().mean(-1).sum())
        tokens += n
    g.train(was_training)
    return dict(kl=kl / tokens, topk_agreement=agree / tokens, tokens=tokens, k=teacher.top_k)


def kl_to_source(g: Grouter, source, batches: Optional[Iterable[Tensor]] = None, layer: int = 0) -> float:
    """Mean KL(source router || Grouter) per token; source: a module (run on batches) or TeacherLogits."""
    return heldout_metrics(g, _teacher(source, batches, layer, progress=False))["kl"]


def distill(g: Grouter, source, batches: Optional[Iterable[Tensor]] = None, layer: int = 0, steps: int = 300,
            lr: float = 2e-3, weight_decay: float = 0.01, warmup: float = 0.05, batch_size: Optional[int] = None,
            progress: bool = True) -> List[float]:
    """Train g to reproduce the router of `source` at MoE layer `layer`; returns the loss per step.

    source: a module, run once over `batches` (its router logits are kept, then every epoch reads
    them), or precomputed TeacherLogits (then `batches` is not needed). batch_size: samples per
    step (default: the first batch's size, or 8)."""
    batches = None if isinstance(source, TeacherLogits) else _token_batches(batches)
    teacher = _teacher(source, batches, layer, progress)
    if teacher.num_experts != g.num_experts:
        raise ValueError(f"distill: the source router has {teacher.num_experts} experts, the Grouter "
                         f"{g.num_experts}; the Grouter needs the source's number of experts")
    _check_id_range(g, *teacher.token_range(), "distillation tokens")
    if batch_size is None:
        batch_size = batches[0].shape[0] if batches else 8
    if steps < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"distill: steps, batch_size and lr must be positive, got {steps}, {batch_size}, {lr}")
    device = next(g.parameters()).device
    g.train()
    opt = torch.optim.AdamW(g.parameters(), lr=lr, weight_decay=weight_decay)
    warm = max(1, int(warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    history: List[float] = []
    starts = list(range(0, teacher.count, batch_size))
    try:
        for step in _progress(range(steps), steps, "distill", progress):
            tokens, target, _ = teacher.batch(starts[step % len(starts)], batch_size)
            logits = g(tokens.to(device)).reshape(-1, g.num_experts)
            loss = _kl(target.reshape(-1, g.num_experts).to(device), logits)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(g.parameters(), 1.0)
            opt.step()
            sched.step()
            history.append(loss.detach().item())
    finally:
        g.eval()
    return history


def _gate_probs(logits: Tensor, score: str) -> Tensor:
    """Per-token expert probabilities under the Grouter's score function (sigmoid scores normalised)."""
    if score == "sigmoid":
        p = logits.float().sigmoid()
        return p / p.sum(-1, keepdim=True)
    return logits.float().softmax(-1)


def sequence_balance_loss(logits: Tensor, expert_ids: Tensor, num_experts: int, score: str = "softmax") -> Tensor:
    """Sequence-level GShard loss: mean over sequences of sum_i f_i * P_i, with
    f_i = E / (K * S) * (slots of the sequence routed to i) and P_i the sequence's mean probability
    of i (under `score`). 1 when every sequence is balanced."""
    B, S, K = expert_ids.shape
    probs = _gate_probs(logits, score)  # [B, S, E]
    counts = torch.zeros(B, num_experts, device=logits.device).scatter_add_(
        1, expert_ids.reshape(B, -1), torch.ones(B, S * K, device=logits.device))
    f = counts * num_experts / (K * S)
    return (f * probs.mean(1)).sum(-1).mean()


def batch_balance_loss(logits: Tensor, expert_ids: Tensor, num_experts: int, score: str = "softmax") -> Tensor:
    """Switch/GShard load-balancing loss over the whole batch: E * sum_i f_i * P_i (1 when balanced)."""
    K = expert_ids.shape[-1]
    probs = _gate_probs(logits, score).reshape(-1, num_experts)
    f = torch.bincount(expert_ids.reshape(-1), minlength=num_experts).float() / (probs.shape[0] * K)
    return num_experts * (f * probs.mean(0)).sum()


def _ensure_bias(g: Grouter) -> None:
    if g.proj.bias is None:
        g.proj.bias = nn.Parameter(torch.zeros(g.num_experts, device=g.proj.weight.device, dtype=g.proj.weight.dtype))
        g.config["bias"] = True


def tune(g: Grouter, batches: Iterable[Tensor], method: str = "bias", steps: int = 200, lr: Optional[float] = None,
         bias_rate: float = 0.02, heldout: Optional[Iterable[Tensor]] = None, eval_every: int = 10,
         progress: bool = True) -> Dict[str, object]:
    """Balance g's load on new data by changing only its final projection; returns a report.

    method "bias" (default): the projection's bias moves by sign updates towards equal load (no
    gradient; adds a bias if g has none). "aux": weight and bias trained by the batch-level
    load-balancing loss alone, under g's score function (AdamW with cosine decay as in the paper;
    lr 1e-2 by default, for short runs). MaxVio is measured on `heldout` (default: the tuning batches) every `eval_every`
    steps; the best state seen is kept, so the result is never less balanced than the start.
    Returns {"max_vio_before", "max_vio_after", "best_step" (0 = the start), "history", "evaluated_on"}.
    """
    if method not in ("aux", "bias"):
        raise ValueError(f"method must be 'aux' or 'bias', got {method!r}")
    if steps < 1 or eval_every < 1 or (lr is not None and not lr > 0):
        raise ValueError(f"tune: steps and eval_every must be positive and lr positive or None, got {steps}, "
                         f"{eval_every}, {lr}")
    train = _token_batches(batches)
    check = _token_batches(heldout, "heldout") if heldout is not None else train
    for b in train + check:
        _check_vocab(g, b, "tuning tokens")
    device = next(g.parameters()).device
    had_bias = g.proj.bias is not None
    if method == "bias":
        _ensure_bias(g)
    requires = {p: p.requires_grad for p in g.parameters()}

    def measure() -> float:
        return routed_max_vio(g, check)

    def snapshot():
        return {k: v.detach().clone() for k, v in g.proj.state_dict().items()}

    before = best_vio = measure()
    best_state, best_step = snapshot(), 0
    history: List[float] = []
    data = _cycle(train)
    params = [g.proj.weight] + ([g.proj.bias] if g.proj.bias is not None else [])
    try:
        for p in g.parameters():
            p.requires_grad_(False)
        if method == "aux":
            for p in params:
                p.requires_grad_(True)
            opt = torch.optim.AdamW(params, lr=1e-2 if lr is None else lr, weight_decay=0.0)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
            g.train()
        for step in _progress(range(1, steps + 1), steps, f"tune ({method})", progress):
            batch = next(data).to(device)
            if method == "bias":
                ids, _ = g.route(batch)
                load = torch.bincount(ids.reshape(-1), minlength=g.num_experts).float()
                with torch.no_grad():
                    g.proj.bias.add_((bias_rate if lr is None else lr) * torch.sign(load.mean() - load).to(g.proj.bias))
                history.append(max_vio(ids, g.num_experts))
            else:
                logits = g(batch)
                ids = logits.detach().topk(g.top_k, dim=-1).indices
                loss = batch_balance_loss(logits, ids, g.num_experts, g.score)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                history.append(loss.detach().item())
            if step % eval_every == 0 or step == steps:
                g.eval()
                vio = measure()
                if vio < best_vio:
                    best_vio, best_state, best_step = vio, snapshot(), step
                if method == "aux":
                    g.train()
    finally:
        g.eval()
        for p, flag in requires.items():
            p.requires_grad_(flag)
    g.proj.load_state_dict(best_state)
    if best_step == 0 and method == "bias" and not had_bias:
        g.proj.bias = None  # nothing improved: leave g exactly as it came
        g.config["bias"] = False
    return {"max_vio_before": before, "max_vio_after": best_vio, "best_step": best_step, "history": history,
            "evaluated_on": "heldout" if heldout is not None else "tuning batches"}
