"""Pre-norm self-attention with rotary positions, causal or bidirectional, padding- and cache-aware.

In grouter.nn, the lowest layer that uses it: the Grouter's blocks (grouter.router.model) and the
demo's language models are built from it.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Attention"]


def _rotary(seq_len: int, dim: int, base: float, device, dtype) -> Tuple[Tensor, Tensor]:
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotary_at(positions: Tensor, dim: int, base: float, dtype) -> Tuple[Tensor, Tensor]:
    """cos, sin [B, S, 1, dim/2] at explicit positions [B, S] (the same products as `_rotary`)."""
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return angles.cos().to(dtype)[:, :, None], angles.sin().to(dtype)[:, :, None]


def _apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    """Pre-norm multi-head self-attention with rotary positions, causal or bidirectional."""

    def __init__(self, d_model: int, n_heads: int, causal: bool = True, rope_base: float = 10000.0):
        super().__init__()
        if d_model % n_heads or (d_model // n_heads) % 2:
            raise ValueError(f"d_model={d_model} must split into n_heads={n_heads} heads of even size")
        self.n_heads, self.causal, self.rope_base = n_heads, causal, rope_base
        self.norm = nn.RMSNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: Tensor, positions: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None,
                past: Optional[list] = None) -> Tensor:
        """x [B, S, D]. Without `positions` the rows are whole unpadded sequences (the fast path);
        otherwise positions [B, S], attn_mask [B, S, P+S] (True = may attend) and `past`, a
        [keys, values] pair of this layer's cache (P earlier positions), extended in place."""
        B, S, D = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, S, 3, self.n_heads, D // self.n_heads).unbind(2)
        if positions is None:
            cos, sin = _rotary(S, D // self.n_heads, self.rope_base, x.device, q.dtype)
            cos, sin = cos[:, None], sin[:, None]
        else:
            cos, sin = _rotary_at(positions, D // self.n_heads, self.rope_base, q.dtype)
        q, k, v = _apply_rotary(q, cos, sin).transpose(1, 2), _apply_rotary(k, cos, sin).transpose(1, 2), v.transpose(1, 2)
        if past is not None:
            if past[0] is not None:
                k, v = torch.cat((past[0], k), 2), torch.cat((past[1], v), 2)
            past[0], past[1] = k, v
        if attn_mask is None:
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask[:, None])
        return self.out(attn.transpose(1, 2).reshape(B, S, D))
