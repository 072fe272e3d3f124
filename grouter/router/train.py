"""Training a Grouter: distillation from a source MoE's router, and expert tuning for balance.

distill: KL(softmax(source router logits at MoE layer `layer`) || softmax(Grouter logits)) over
    all experts, no temperature. The source's logits are captured by a forward hook on its router
    (transformers MoE blocks, or grouter.nn.MoE layers with a learned router).
tune: only the final projection W_s learns (method "aux": weight and bias by the sequence-level
    GShard load-balancing loss; "bias": only the bias, by loss-free sign updates towards equal load).
"""

from __future__ import annotations

import itertools
import math
from typing import Dict, Iterable, List, Optional

import torch
from torch import Tensor, nn

from .metrics import max_vio
from .model import Grouter

__all__ = ["distill", "tune", "router_logit_capture", "sequence_balance_loss", "kl_to_source"]


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


class router_logit_capture:
    """Context manager: records the router logits [tokens, E] of MoE layer `layer` of `source`."""

    def __init__(self, source: nn.Module, layer: int = 0):
        from ..hf import moe_blocks
        from ..nn.moe import MoE

        self.logits: Optional[Tensor] = None
        hf = moe_blocks(source)
        ours = [m for m in source.modules() if isinstance(m, MoE) and m.router is not None]
        if hf:
            candidates = [getattr(block, attr) for _, block, attr in hf]
            self._read = lambda module, out: out[0]
        elif ours:
            candidates = [m.router for m in ours]
            self._read = lambda module, out: module.logits
        else:
            raise ValueError(f"distill: {type(source).__name__} has no MoE layer with a learned router")
        if not -len(candidates) <= layer < len(candidates):
            raise ValueError(f"distill: layer={layer}, but the source has {len(candidates)} MoE layers")
        self._module = candidates[layer]
        self._handle = None

    def __enter__(self):
        def hook(module, args, out):
            self.logits = self._read(module, out).detach()

        self._handle = self._module.register_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def _kl(source_logits: Tensor, logits: Tensor) -> Tensor:
    p_log = source_logits.float().log_softmax(-1)
    q_log = logits.float().log_softmax(-1)
    return (p_log.exp() * (p_log - q_log)).sum(-1).mean()


@torch.no_grad()
def kl_to_source(g: Grouter, source: nn.Module, batches: Iterable[Tensor], layer: int = 0) -> float:
    """Mean KL(source router || Grouter) over batches."""
    device = next(g.parameters()).device
    total, n = 0.0, 0
    with router_logit_capture(source, layer) as cap:
        for b in batches:
            source(b.to(next(source.parameters()).device))
            total += float(_kl(cap.logits.to(device), g(b.to(device)).reshape(-1, g.num_experts)))
            n += 1
    return total / max(n, 1)


def distill(g: Grouter, source: nn.Module, batches: Iterable[Tensor], layer: int = 0, steps: int = 300,
            lr: float = 2e-3, weight_decay: float = 0.01, warmup: float = 0.05, progress: bool = True) -> List[float]:
    """Train g to reproduce the router of `source` at MoE layer `layer`; returns the loss per step."""
    if not isinstance(source, nn.Module):
        raise TypeError("source must be a torch module (a transformers or grouter MoE model)")
    device = next(g.parameters()).device
    src_device = next(source.parameters()).device
    was_training = source.training
    source.eval()
    g.train()
    opt = torch.optim.AdamW(g.parameters(), lr=lr, weight_decay=weight_decay)
    warm = max(1, int(warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    history: List[float] = []
    data = _cycle(batches)
    with router_logit_capture(source, layer) as cap:
        for _ in _progress(range(steps), steps, "distill", progress):
            batch = next(data)
            with torch.no_grad():
                source(batch.to(src_device))
            target = cap.logits.to(device)
            logits = g(batch.to(device)).reshape(-1, g.num_experts)
            if target.shape != logits.shape:
                raise ValueError(f"distill: source logits {tuple(target.shape)} vs Grouter {tuple(logits.shape)}; "
                                 "the Grouter needs the source's number of experts")
            loss = _kl(target, logits)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(g.parameters(), 1.0)
            opt.step()
            sched.step()
            history.append(loss.detach().item())
    source.train(was_training)
    g.eval()
    return history


def sequence_balance_loss(logits: Tensor, expert_ids: Tensor, num_experts: int) -> Tensor:
    """Sequence-level GShard loss: mean over sequences of sum_i f_i * P_i, with
    f_i = E / (K * S) * (slots of the sequence routed to i) and P_i the sequence's mean probability
    of i. 1 when every sequence is balanced."""
    B, S, K = expert_ids.shape
    probs = logits.float().softmax(-1)  # [B, S, E]
    counts = torch.zeros(B, num_experts, device=logits.device).scatter_add_(
        1, expert_ids.reshape(B, -1), torch.ones(B, S * K, device=logits.device))
    f = counts * num_experts / (K * S)
    return (f * probs.mean(1)).sum(-1).mean()


def _routes(g: Grouter, batches: List[Tensor]) -> Tensor:
    device = next(g.parameters()).device
    return torch.cat([g.route(b.to(device))[0].reshape(-1, g.top_k).cpu() for b in batches])


def _ensure_bias(g: Grouter) -> None:
    if g.proj.bias is None:
        g.proj.bias = nn.Parameter(torch.zeros(g.num_experts, device=g.proj.weight.device, dtype=g.proj.weight.dtype))
        g.config["bias"] = True


def tune(g: Grouter, batches: Iterable[Tensor], method: str = "aux", steps: int = 200, lr: float = 1e-2,
         bias_rate: float = 0.02, progress: bool = True) -> Dict[str, object]:
    """Balance g's load on new data by training only its final projection.

    Returns {"max_vio_before", "max_vio_after", "history"} (MaxVio over all the batches' routes;
    history: the balance loss per step for "aux", the MaxVio per step for "bias")."""
    if method not in ("aux", "bias"):
        raise ValueError(f"method must be 'aux' or 'bias', got {method!r}")
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty")
    device = next(g.parameters()).device
    before = max_vio(_routes(g, batches), g.num_experts)
    for p in g.parameters():
        p.requires_grad_(False)
    history: List[float] = []
    data = _cycle(batches)
    if method == "bias":
        _ensure_bias(g)
        for _ in _progress(range(steps), steps, "tune (bias)", progress):
            ids, _ = g.route(next(data).to(device))
            load = torch.bincount(ids.reshape(-1), minlength=g.num_experts).float()
            with torch.no_grad():
                g.proj.bias.add_(bias_rate * torch.sign(load.mean() - load).to(g.proj.bias))
            history.append(max_vio(ids, g.num_experts))
    else:
        params = [g.proj.weight] + ([g.proj.bias] if g.proj.bias is not None else [])
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=lr)
        g.train()
        for _ in _progress(range(steps), steps, "tune (aux)", progress):
            batch = next(data).to(device)
            logits = g(batch if batch.dim() == 2 else batch[None])
            ids = logits.detach().topk(g.top_k, dim=-1).indices
            loss = sequence_balance_loss(logits, ids, g.num_experts)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append(loss.detach().item())
        g.eval()
    for p in g.parameters():
        p.requires_grad_(True)
    after = max_vio(_routes(g, batches), g.num_experts)
    return {"max_vio_before": before, "max_vio_after": after, "history": history}
