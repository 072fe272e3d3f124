"""Plain-PyTorch references for every compiled op: the spec the kernels are tested against.

Written for clarity, not speed. Integer outputs must match exactly; combines accumulate in the
same dtype and k order as the contract states (fp32, or fp64 when y or the weights are fp64), so
the kernels match them bitwise too.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def acc_dtype(y_dtype: torch.dtype, w_dtype: Optional[torch.dtype] = None) -> torch.dtype:
    return torch.float64 if torch.float64 in (y_dtype, w_dtype) else torch.float32


def routing_plan(expert_ids: Tensor, num_experts: int):
    """Expert-major order of the (t, k) slots, ascending (t, k) inside each expert."""
    T, K = expert_ids.shape
    flat = expert_ids.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices  # slot index t*K+k, stable => ascending (t, k)
    sorted_tokens = (order // max(K, 1)).to(torch.int32)
    row_of = torch.empty(T * K, dtype=torch.int64, device=flat.device)
    row_of[order] = torch.arange(T * K, device=flat.device)
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return sorted_tokens, row_of.view(T, K).to(torch.int32), offsets


def permute(x: Tensor, row_of: Tensor) -> Tensor:
    T, K = row_of.shape
    out = x.new_empty(T * K, x.shape[1])
    out[row_of.reshape(-1).long()] = x.repeat_interleave(K, dim=0)
    return out


def unpermute(y: Tensor, row_of: Tensor, weights: Optional[Tensor] = None) -> Tensor:
    T, K = row_of.shape
    acc = acc_dtype(y.dtype, None if weights is None else weights.dtype)
    out = torch.zeros(T, y.shape[1], dtype=acc, device=y.device)
    for k in range(K):
        rows = y[row_of[:, k].long()].to(acc)
        if weights is not None:
            rows = weights[:, k, None].to(acc) * rows
        out = out + rows
    return out.to(y.dtype)


def unpermute_backward(grad_out: Tensor, row_of: Tensor, weights: Optional[Tensor], y: Optional[Tensor]):
    """(grad_y, grad_weights) of unpermute; grad_weights is None without weights or y."""
    T, K = row_of.shape
    acc = acc_dtype(grad_out.dtype, None if weights is None else weights.dtype)
    g = grad_out.to(acc)
    flat_rows = row_of.reshape(-1).long()
    scaled = g.repeat_interleave(K, dim=0)
    if weights is not None:
        scaled = weights.reshape(-1, 1).to(acc) * scaled
    grad_y = torch.empty(T * K, grad_out.shape[1], dtype=grad_out.dtype, device=grad_out.device)
    grad_y[flat_rows] = scaled.to(grad_out.dtype)
    if weights is None or y is None:
        return grad_y, None
    grad_w = (g[:, None, :] * y[row_of.long()].to(acc)).sum(-1)
    return grad_y, grad_w.to(weights.dtype)


def coactivation(expert_ids: Tensor, num_experts: int) -> Tensor:
    T = expert_ids.shape[0]
    hot = torch.zeros(T, num_experts, dtype=torch.float64, device=expert_ids.device)
    hot.scatter_(1, expert_ids.long(), 1.0)
    return (hot.T @ hot).round().to(torch.int64)  # exact: counts < 2**53


def random_routing(T: int, K: int, E: int, dtype=torch.int64, device="cpu", generator=None) -> Tensor:
    """Distinct expert ids per token, drawn uniformly (and skewed, to exercise uneven loads)."""
    if T == 0:
        return torch.empty(0, K, dtype=dtype, device=device)
    scores = torch.rand(T, E, generator=generator)
    scores[:, : max(1, E // 4)] += 0.5  # a few hot experts
    return scores.topk(K, dim=1).indices.to(dtype=dtype, device=device)


GLU_ACTIVATIONS = {
    "silu": torch.nn.functional.silu,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "relu": torch.relu,
}


def glu(h: Tensor, activation: str = "silu") -> Tensor:
    """act(gate) * up for h = [gate | up]."""
    gate, up = h.chunk(2, dim=-1)
    return GLU_ACTIVATIONS[activation](gate) * up


def swiglu(h: Tensor) -> Tensor:
    gate, up = h.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def expert_mlp(rows: Tensor, expert_offsets: Tensor, gate_up_proj: Tensor, down_proj: Tensor,
               activation: str = "silu"):
    """(out, h) of grouter::expert_mlp: rows expert_offsets[e]:[e+1] through expert e's gated MLP."""
    bounds = expert_offsets.tolist()
    h = torch.cat([rows[s:t] @ gate_up_proj[e].t() for e, (s, t) in enumerate(zip(bounds, bounds[1:]))]
                  + [rows.new_zeros(0, gate_up_proj.shape[1])])
    out = torch.cat([glu(h[s:t], activation) @ down_proj[e].t() for e, (s, t) in enumerate(zip(bounds, bounds[1:]))]
                    + [rows.new_zeros(0, down_proj.shape[1])])
    return out, h


def moe_experts(x: Tensor, expert_ids: Tensor, weights: Tensor, gate_up_proj: Tensor, down_proj: Tensor,
                act=swiglu) -> Tensor:
    """A token's output: sum_k weights[t,k] * down[e](act(gate_up[e] x_t)), e = expert_ids[t,k].

    Per-expert masks and index_add: slow and obvious, the spec of grouter.nn.MoE's experts."""
    out = torch.zeros_like(x)
    for k in range(expert_ids.shape[1]):
        for e in expert_ids[:, k].unique().tolist():
            tok = (expert_ids[:, k] == e).nonzero().squeeze(1)
            y = act(x[tok] @ gate_up_proj[e].t()) @ down_proj[e].t()
            out = out.index_add(0, tok, y * weights[tok, k, None].to(y.dtype))
    return out
