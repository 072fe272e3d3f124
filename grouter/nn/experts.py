"""Expert MLPs over expert-major rows: weights laid out like transformers v5 experts.

`gate_up_proj [E, 2I, H]` and `down_proj [E, H, I]`, so weights move between a grouter MoE and a
transformers model without reshaping. The computation runs on the rows `grouter.ops.permute`
produced: expert e owns rows `offsets[e]:offsets[e+1]`, so each projection is one matmul per
non-empty expert slice (or one `grouped_mm` where the device and dtype have it). No per-expert
`index_select`, no boolean masks.

`expert_mlp` is one autograd node that saves only its input rows and the [N, 2I] gate/up
projection; the [N, I] activation is recomputed in backward instead of stored.
"""

from __future__ import annotations

import math
from typing import Callable, List, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Experts", "expert_mlp", "glu", "ACTIVATIONS"]

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def glu(h: Tensor, act: Callable[[Tensor], Tensor] = F.silu) -> Tensor:
    """act(gate) * up for h = [gate | up] (SwiGLU for silu), the transformers v5 convention."""
    gate, up = h.chunk(2, dim=-1)
    return act(gate) * up


Slices = List[Tuple[int, int, int]]  # (expert, first row, end row) of the non-empty experts


def _slices(expert_offsets: Union[Tensor, Sequence[int]]) -> Slices:
    # One device-to-host copy per call (none for host offsets), not one per expert.
    bounds = expert_offsets.tolist() if isinstance(expert_offsets, Tensor) else list(expert_offsets)
    return [(e, bounds[e], bounds[e + 1]) for e in range(len(bounds) - 1) if bounds[e + 1] > bounds[e]]


def _grouped_linear(x: Tensor, weight: Tensor, slices: Slices) -> Tensor:
    """out[rows of e] = x[rows of e] @ weight[e].T for weight [E, out, in]."""
    out = x.new_empty(x.shape[0], weight.shape[1])  # the slices of a RoutingPlan cover every row
    for e, start, end in slices:
        torch.mm(x[start:end], weight[e].t(), out=out[start:end])
    return out


def _grouped_mm_ok(x: Tensor, weight: Tensor) -> bool:
    """torch's grouped_mm: on CUDA (sm80+) in bf16, where it beats a loop of mm."""
    return (
        hasattr(F, "grouped_mm")
        and x.is_cuda
        and x.dtype == torch.bfloat16
        and weight.dtype == torch.bfloat16
        and torch.cuda.get_device_capability(x.device) >= (8, 0)
    )


def _swiglu_backward(h: Tensor, grad_a: Tensor) -> Tuple[Tensor, Tensor]:
    """(a, grad_h) of a = silu(gate) * up, written straight into the halves of grad_h (no cat)."""
    gate, up = h.chunk(2, dim=-1)
    silu_gate = F.silu(gate)
    grad_h = torch.empty_like(h)
    grad_gate, grad_up = grad_h.chunk(2, dim=-1)
    torch.ops.aten.silu_backward.grad_input(grad_a * up, gate, grad_input=grad_gate)
    torch.mul(grad_a, silu_gate, out=grad_up)
    return silu_gate.mul_(up), grad_h


def _gate_backward(gate_fn, h: Tensor, grad_a: Tensor) -> Tuple[Tensor, Tensor]:
    """(a, grad_h) for any differentiable gate, by recomputing it under autograd."""
    with torch.enable_grad():
        h_ = h.detach().requires_grad_(True)
        a = gate_fn(h_)
    (grad_h,) = torch.autograd.grad(a, h_, grad_a)
    return a.detach(), grad_h


class _ExpertMLP(torch.autograd.Function):
    """down(gate_fn(gate_up(rows))) per expert slice, saving rows and gate_up(rows) only; the
    [N, I] activation is recomputed in backward."""

    @staticmethod
    def forward(ctx, rows, gate_up_proj, down_proj, slices, gate_fn):
        h = _grouped_linear(rows, gate_up_proj, slices)
        if gate_fn is glu:  # SwiGLU without a temporary
            gate, up = h.chunk(2, dim=-1)
            a = F.silu(gate).mul_(up)
        else:
            a = gate_fn(h)
        out = _grouped_linear(a, down_proj, slices)
        ctx.save_for_backward(rows, h, gate_up_proj, down_proj)
        ctx.slices, ctx.gate_fn = slices, gate_fn
        return out

    @staticmethod
    def backward(ctx, grad_out):
        rows, h, gate_up_proj, down_proj = ctx.saved_tensors
        slices, gate_fn = ctx.slices, ctx.gate_fn
        need_rows, need_gate_up, need_down = ctx.needs_input_grad[:3]
        grad_out = grad_out.contiguous()
        grad_a = h.new_empty(h.shape[0], down_proj.shape[2])
        for e, s, t in slices:
            torch.mm(grad_out[s:t], down_proj[e], out=grad_a[s:t])
        if gate_fn is glu:
            a, grad_h = _swiglu_backward(h, grad_a)
        else:
            a, grad_h = _gate_backward(gate_fn, h, grad_a)
        grad_down = _per_expert_grad(down_proj, slices, grad_out, a) if need_down else None
        grad_gate_up = _per_expert_grad(gate_up_proj, slices, grad_h, rows) if need_gate_up else None
        grad_rows = None
        if need_rows:
            grad_rows = rows.new_empty(rows.shape)
            for e, s, t in slices:
                torch.mm(grad_h[s:t], gate_up_proj[e], out=grad_rows[s:t])
        return grad_rows, grad_gate_up, grad_down, None, None


def _per_expert_grad(weight: Tensor, slices: Slices, grad: Tensor, inp: Tensor) -> Tensor:
    """grad_weight[e] = grad[rows of e].T @ inp[rows of e]; zero for experts without rows."""
    out = torch.empty_like(weight)
    if len(slices) < weight.shape[0]:
        out.zero_()
    for e, s, t in slices:
        torch.mm(grad[s:t].t(), inp[s:t], out=out[e])
    return out


def expert_mlp(rows: Tensor, expert_offsets: Union[Tensor, Sequence[int]], gate_up_proj: Tensor, down_proj: Tensor,
               gate_fn: Callable[[Tensor], Tensor] = glu) -> Tensor:
    """Expert MLP of expert-major rows [N, H] (expert e owns rows expert_offsets[e]:[e+1]) -> [N, H].

    expert_offsets: a tensor [E+1], or a host sequence (then no device-to-host copy on the mm path).
    Empty inputs stay in the autograd graph (zero weight gradients): expert parallelism relies on
    every rank running the same backward, whether or not tokens reached its experts.
    """
    if _grouped_mm_ok(rows, gate_up_proj) and rows.shape[0] > 0:
        offs = torch.as_tensor(expert_offsets, device=rows.device)[1:].to(torch.int32)
        h = F.grouped_mm(rows, gate_up_proj.transpose(-2, -1), offs=offs)
        return F.grouped_mm(gate_fn(h), down_proj.transpose(-2, -1), offs=offs)
    return _ExpertMLP.apply(rows, gate_up_proj, down_proj, _slices(expert_offsets), gate_fn)


class Experts(nn.Module):
    """E gated MLP experts (SwiGLU by default), stored as transformers v5 stores them."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, activation: str = "silu",
                 device=None, dtype=None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        factory = dict(device=device, dtype=dtype)
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.activation = activation
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size, **factory))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default range, per expert.
        nn.init.uniform_(self.gate_up_proj, -1 / math.sqrt(self.hidden_size), 1 / math.sqrt(self.hidden_size))
        nn.init.uniform_(self.down_proj, -1 / math.sqrt(self.intermediate_size), 1 / math.sqrt(self.intermediate_size))

    def gate_fn(self, h: Tensor) -> Tensor:
        return glu(h, ACTIVATIONS[self.activation])

    def forward(self, rows: Tensor, expert_offsets: Union[Tensor, Sequence[int]]) -> Tensor:
        gate_fn = glu if self.activation == "silu" else self.gate_fn  # glu: the fused SwiGLU path
        return expert_mlp(rows, expert_offsets, self.gate_up_proj, self.down_proj, gate_fn)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
                f"intermediate_size={self.intermediate_size}, activation={self.activation!r}")
