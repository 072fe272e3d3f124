"""The expert MLP over expert-major rows, as one traceable op: ``grouter::expert_mlp``.

Expert e owns rows ``offsets[e]:offsets[e+1]`` (what `grouter.ops.permute` produced), so each
projection is one matmul per non-empty expert slice: no per-expert `index_select`, no masks.
Between the projections the gated activation runs fused (``grouter::glu``: one pass forward, one
backward, fp32 math for fp32/bf16/fp16). Forward saves only the input rows and the [N, 2I]
gate/up projection; the [N, I] activation is recomputed by the fused backward. The op is defined in
C++ with its CPU kernel (csrc/cpu/expert_mlp.cpp: one expert at a time, its activation between its
GEMMs while still in cache); CUDA runs torch's grouped_mm in bf16 (sm80+, aligned H and I) and
other devices and dtypes the Python composite here (per-expert mm and grouter::glu), all behind the
same validation. Fake kernel and autograd are registered here too, so a model that uses it
compiles with ``torch.compile(fullgraph=True)``: the data-dependent slicing stays inside the op. A
gate given as an arbitrary callable takes the same computation through an autograd Function
instead (eager only)."""

from __future__ import annotations

from typing import Callable, List, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import core as ops
from .activations import ACTIVATION_BACKWARD as _ACTIVATION_BACKWARD
from .activations import ACTIVATIONS

__all__ = ["expert_mlp"]


Slices = List[Tuple[int, int, int]]  # (expert, first row, end row) of the non-empty experts


def _slices(expert_offsets: Union[Tensor, Sequence[int]], rows: int, experts: int) -> Slices:
    # One device-to-host copy per call (none for host offsets), not one per expert.
    bounds = expert_offsets.tolist() if isinstance(expert_offsets, Tensor) else list(expert_offsets)
    # Offsets that do not tile [0, rows) would leave rows unwritten (garbage out) or read past them.
    if (len(bounds) != experts + 1 or bounds[0] != 0 or bounds[-1] != rows
            or any(b > a for a, b in zip(bounds[1:], bounds))):
        raise ValueError(f"grouter.expert_mlp: expert offsets must rise from 0 to the {rows} rows over the {experts} "
                         f"experts ({experts + 1} values), got "
                         f"{bounds if len(bounds) <= 16 else bounds[:8] + ['...'] + bounds[-8:]}")
    return [(e, bounds[e], bounds[e + 1]) for e in range(len(bounds) - 1) if bounds[e + 1] > bounds[e]]


def _check_op_args(rows: Tensor, gate_up_proj: Tensor, down_proj: Tensor, activation: str) -> None:
    """What the CPU kernel checks (csrc/cpu/expert_mlp.cpp), for the composite other devices run."""
    if rows.dim() != 2 or not rows.is_floating_point():
        raise ValueError(f"grouter.expert_mlp: rows must be a floating [N, H] tensor, got {tuple(rows.shape)} {rows.dtype}")
    H = rows.shape[1]
    if gate_up_proj.dim() != 3 or gate_up_proj.shape[2] != H or gate_up_proj.shape[1] % 2:
        raise ValueError(f"grouter.expert_mlp: gate_up_proj must be [E, 2I, H={H}], got {tuple(gate_up_proj.shape)}")
    E, I = gate_up_proj.shape[0], gate_up_proj.shape[1] // 2
    if tuple(down_proj.shape) != (E, H, I):
        raise ValueError(f"grouter.expert_mlp: down_proj must be [E={E}, H={H}, I={I}], got {tuple(down_proj.shape)}")
    if not rows.dtype == gate_up_proj.dtype == down_proj.dtype:
        raise ValueError(f"grouter.expert_mlp: rows, gate_up_proj and down_proj must share a dtype, got "
                         f"{rows.dtype}, {gate_up_proj.dtype}, {down_proj.dtype}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"grouter.glu: unknown activation {activation!r} (have {', '.join(ACTIVATIONS)})")


def _grouped_linear(x: Tensor, weight: Tensor, slices: Slices) -> Tensor:
    """out[rows of e] = x[rows of e] @ weight[e].T for weight [E, out, in]."""
    out = x.new_empty(x.shape[0], weight.shape[1])  # the slices of a RoutingPlan cover every row
    for e, start, end in slices:
        torch.mm(x[start:end], weight[e].t(), out=out[start:end])
    return out


def _per_expert_grad(weight: Tensor, slices: Slices, grad: Tensor, inp: Tensor) -> Tensor:
    """grad_weight[e] = grad[rows of e].T @ inp[rows of e]; zero for experts without rows."""
    out = torch.empty_like(weight)
    if len(slices) < weight.shape[0]:
        out.zero_()
    for e, s, t in slices:
        torch.mm(grad[s:t].t(), inp[s:t], out=out[e])
    return out


_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _fused(h: Tensor) -> bool:
    """grouter::glu's kernels (one pass, fp32 math) take h; fp64 and other devices use torch ops."""
    return h.dtype in _FUSED_DTYPES and h.device.type in ("cpu", "cuda")


def _glu(activation: str, h: Tensor) -> Tensor:
    if _fused(h):
        return ops.glu(h, activation)
    gate, up = h.chunk(2, dim=-1)
    return ACTIVATIONS[activation](gate).mul_(up)


def _glu_backward(activation: str, h: Tensor, grad_a: Tensor) -> Tuple[Tensor, Tensor]:
    """(a, grad_h) of a = act(gate) * up: one fused pass (grouter::glu_backward), else torch ops
    written straight into the halves of grad_h. Explicit derivatives: the registered op's backward
    runs below autograd."""
    if _fused(h):
        return torch.ops.grouter.glu_backward(grad_a.to(h.dtype), h, activation)
    gate, up = h.chunk(2, dim=-1)
    act_gate = ACTIVATIONS[activation](gate)
    grad_h = torch.empty_like(h)
    grad_gate, grad_up = grad_h.chunk(2, dim=-1)
    grad_gate.copy_(_ACTIVATION_BACKWARD[activation](grad_a * up, gate))
    torch.mul(grad_a, act_gate, out=grad_up)
    return act_gate.mul_(up), grad_h


def _gate_backward(gate_fn, h: Tensor, grad_a: Tensor) -> Tuple[Tensor, Tensor]:
    """(a, grad_h) for any differentiable gate, by recomputing it under autograd."""
    with torch.enable_grad():
        h_ = h.detach().requires_grad_(True)
        a = gate_fn(h_)
    (grad_h,) = torch.autograd.grad(a, h_, grad_a)
    return a.detach(), grad_h


def _mlp_forward(rows: Tensor, slices: Slices, gate_up_proj: Tensor, down_proj: Tensor, gate) -> Tuple[Tensor, Tensor]:
    """(out [N, H], h = gate_up(rows) [N, 2I]); gate: an activation name or a callable of h."""
    h = _grouped_linear(rows, gate_up_proj, slices)
    a = _glu(gate, h) if isinstance(gate, str) else gate(h)
    return _grouped_linear(a, down_proj, slices), h


def _mlp_backward(grad_out: Tensor, rows: Tensor, h: Tensor, slices: Slices, gate_up_proj: Tensor, down_proj: Tensor,
                  gate, needs: Sequence[bool]):
    """(grad_rows, grad_gate_up, grad_down), None where `needs` says it is not wanted."""
    need_rows, need_gate_up, need_down = needs
    grad_out = grad_out.contiguous()
    grad_a = h.new_empty(h.shape[0], down_proj.shape[2])
    for e, s, t in slices:
        torch.mm(grad_out[s:t], down_proj[e], out=grad_a[s:t])
    a, grad_h = _glu_backward(gate, h, grad_a) if isinstance(gate, str) else _gate_backward(gate, h, grad_a)
    grad_down = _per_expert_grad(down_proj, slices, grad_out, a) if need_down else None
    grad_gate_up = _per_expert_grad(gate_up_proj, slices, grad_h, rows) if need_gate_up else None
    grad_rows = None
    if need_rows:
        grad_rows = rows.new_empty(rows.shape)
        for e, s, t in slices:
            torch.mm(grad_h[s:t], gate_up_proj[e], out=grad_rows[s:t])
    return grad_rows, grad_gate_up, grad_down


# --- the registered op (activations by name) ----------------------------------------------------
# grouter::expert_mlp is defined in csrc/ops.cpp with its CPU kernel in csrc/cpu/expert_mlp.cpp
# (per-expert GEMMs with the fused activation between them, recycled outputs). Other devices run
# the composite below (per-expert torch.mm and grouter::glu's kernels).

def _expert_mlp_composite(rows, expert_offsets, gate_up_proj, down_proj, activation):
    _check_op_args(rows, gate_up_proj, down_proj, activation)
    slices = _slices(expert_offsets, rows.shape[0], gate_up_proj.shape[0])
    return _mlp_forward(rows, slices, gate_up_proj, down_proj, activation)


def _expert_mlp_backward_composite(grad_out, rows, h, expert_offsets, gate_up_proj, down_proj, activation):
    _check_op_args(rows, gate_up_proj, down_proj, activation)
    if grad_out.shape != rows.shape or grad_out.dtype != rows.dtype or h.shape != (rows.shape[0], gate_up_proj.shape[1]):
        raise ValueError(f"grouter.expert_mlp_backward: grad_out must be [N, H] = {tuple(rows.shape)} and h [N, 2I] = "
                         f"{(rows.shape[0], gate_up_proj.shape[1])} in {rows.dtype}, got {tuple(grad_out.shape)} "
                         f"{grad_out.dtype} and {tuple(h.shape)}")
    slices = _slices(expert_offsets, rows.shape[0], gate_up_proj.shape[0])
    return _mlp_backward(grad_out, rows, h, slices, gate_up_proj, down_proj, activation, (True, True, True))


torch.library.impl("grouter::expert_mlp", "default", _expert_mlp_composite)
torch.library.impl("grouter::expert_mlp_backward", "default", _expert_mlp_backward_composite)


# --- CUDA: torch's grouped_mm in bf16 -------------------------------------------------------------
# One grouped GEMM per projection instead of a loop of mm (and no host copy of the offsets with
# checks off, so it can be captured in a CUDA graph). Behind the composite's validation: with
# checks on, offsets that do not tile the rows raise (grouped_mm would leave trailing rows
# unwritten and they would be combined into tokens); unaligned H or I take the composite.

def _grouped_mm_ok(x: Tensor, gate_up_proj: Tensor, down_proj: Tensor) -> bool:
    """torch's grouped_mm: on CUDA (sm80+) in bf16, where it beats a loop of mm, and for the
    16-byte aligned strides it needs (H and I multiples of 8); otherwise the composite."""
    return (
        hasattr(F, "grouped_mm")
        and x.is_cuda
        and x.shape[0] > 0
        and x.dtype == gate_up_proj.dtype == down_proj.dtype == torch.bfloat16
        and x.shape[-1] % 8 == 0
        and gate_up_proj.shape[1] % 16 == 0
        and torch.cuda.get_device_capability(x.device) >= (8, 0)
    )


def _group_ends(expert_offsets: Tensor, rows: int, experts: int) -> Tensor:
    """grouped_mm's offs (each group's end row, int32) after the op's checks: the whole
    validation with checks on (one host copy), the shape only with checks off (no sync)."""
    if ops.cuda_checks_enabled():
        _slices(expert_offsets, rows, experts)
    elif tuple(expert_offsets.shape) != (experts + 1,):
        raise ValueError(f"grouter.expert_mlp: expert offsets must have {experts + 1} values, got "
                         f"{tuple(expert_offsets.shape)}")
    return expert_offsets[1:].to(torch.int32)


def _expert_mlp_grouped(rows, expert_offsets, gate_up_proj, down_proj, activation):
    _check_op_args(rows, gate_up_proj, down_proj, activation)
    if not _grouped_mm_ok(rows, gate_up_proj, down_proj):
        return _expert_mlp_composite(rows, expert_offsets, gate_up_proj, down_proj, activation)
    offs = _group_ends(expert_offsets, rows.shape[0], gate_up_proj.shape[0])
    h = F.grouped_mm(rows, gate_up_proj.transpose(-2, -1), offs=offs)
    return F.grouped_mm(_glu(activation, h), down_proj.transpose(-2, -1), offs=offs), h


def _expert_mlp_backward_grouped(grad_out, rows, h, expert_offsets, gate_up_proj, down_proj, activation):
    if not _grouped_mm_ok(rows, gate_up_proj, down_proj) or grad_out.shape != rows.shape \
            or h.shape != (rows.shape[0], gate_up_proj.shape[1]):
        return _expert_mlp_backward_composite(grad_out, rows, h, expert_offsets, gate_up_proj, down_proj, activation)
    _check_op_args(rows, gate_up_proj, down_proj, activation)
    offs = _group_ends(expert_offsets, rows.shape[0], gate_up_proj.shape[0])
    grad_out = grad_out.to(rows.dtype).contiguous()
    grad_a = F.grouped_mm(grad_out, down_proj, offs=offs)
    a, grad_h = _glu_backward(activation, h, grad_a)
    # [out, N] x [N, in] grouped along N: one weight gradient per expert. Experts without rows
    # get exact zeros whatever the GEMM leaves in their slice.
    empty = (expert_offsets.diff() == 0).view(-1, 1, 1)
    grad_down = F.grouped_mm(grad_out.t(), a, offs=offs).masked_fill_(empty, 0)
    grad_gate_up = F.grouped_mm(grad_h.t(), rows, offs=offs).masked_fill_(empty, 0)
    return F.grouped_mm(grad_h, gate_up_proj, offs=offs), grad_gate_up, grad_down


torch.library.impl("grouter::expert_mlp", "CUDA", _expert_mlp_grouped)
torch.library.impl("grouter::expert_mlp_backward", "CUDA", _expert_mlp_backward_grouped)


@torch.library.register_fake("grouter::expert_mlp")
def _(rows, expert_offsets, gate_up_proj, down_proj, activation):
    # As every op's fake kernel: meta weights with real rows would return uninitialised memory.
    ops._check_devices("expert_mlp", rows, expert_offsets, gate_up_proj, down_proj)
    return rows.new_empty(rows.shape[0], down_proj.shape[1]), rows.new_empty(rows.shape[0], gate_up_proj.shape[1])


@torch.library.register_fake("grouter::expert_mlp_backward")
def _(grad_out, rows, h, expert_offsets, gate_up_proj, down_proj, activation):
    ops._check_devices("expert_mlp_backward", grad_out, rows, h, expert_offsets, gate_up_proj, down_proj)
    return torch.empty_like(rows), torch.empty_like(gate_up_proj), torch.empty_like(down_proj)


def _setup_context(ctx, inputs, output):
    rows, expert_offsets, gate_up_proj, down_proj, activation = inputs
    ctx.save_for_backward(rows, output[1], expert_offsets, gate_up_proj, down_proj)
    ctx.activation = activation
    # h is an output only to be saved: not differentiable, and no zero [N, 2I] gradient made for it.
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, _grad_h):
    if grad_out is None:
        return None, None, None, None, None
    rows, h, expert_offsets, gate_up_proj, down_proj = ctx.saved_tensors
    grad_rows, grad_gate_up, grad_down = torch.ops.grouter.expert_mlp_backward(
        grad_out, rows, h, expert_offsets, gate_up_proj, down_proj, ctx.activation)
    return grad_rows, None, grad_gate_up, grad_down, None


torch.library.register_autograd("grouter::expert_mlp", _backward, setup_context=_setup_context)
torch.library.register_autograd("grouter::expert_mlp_backward", ops.no_double_backward("expert_mlp"),
                                setup_context=lambda ctx, inputs, output: None)


# --- any gate callable, host offsets ------------------------------------------------------------

class _ExpertMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, gate_up_proj, down_proj, slices, gate):
        out, h = _mlp_forward(rows, slices, gate_up_proj, down_proj, gate)
        ctx.save_for_backward(rows, h, gate_up_proj, down_proj)
        ctx.slices, ctx.gate = slices, gate
        return out

    @staticmethod
    def backward(ctx, grad_out):
        rows, h, gate_up_proj, down_proj = ctx.saved_tensors
        grads = _mlp_backward(grad_out, rows, h, ctx.slices, gate_up_proj, down_proj, ctx.gate,
                              ctx.needs_input_grad[:3])
        return (*grads, None, None)


def expert_mlp(rows: Tensor, expert_offsets: Union[Tensor, Sequence[int]], gate_up_proj: Tensor, down_proj: Tensor,
               gate: Union[str, Callable[[Tensor], Tensor]] = "silu") -> Tensor:
    """Expert MLP of expert-major rows [N, H] (expert e owns rows expert_offsets[e]:[e+1]) -> [N, H].

    gate: an activation name of ACTIVATIONS (the registered, compilable op; "silu" = SwiGLU), or
    any callable of h = [gate | up] [N, 2I] -> [N, I]. expert_offsets: a tensor [E+1] on the rows'
    device, or a host sequence (expert parallelism: made a tensor on the rows' device for a named
    activation, used as it is for a callable). Empty inputs stay in the autograd graph (zero
    weight gradients): expert parallelism relies on every rank running the same backward.
    """
    if isinstance(gate, str) and gate not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {gate!r}")
    device = rows.device.type
    if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
        # As autocast treats a linear layer: inputs and weights in its dtype, gradients flow back
        # to the fp32 parameters through the casts.
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            return expert_mlp(rows.to(dtype), expert_offsets, gate_up_proj.to(dtype), down_proj.to(dtype), gate)
    if isinstance(gate, str):
        if not isinstance(expert_offsets, Tensor):
            expert_offsets = torch.tensor(list(expert_offsets), dtype=torch.long, device=rows.device)
        return torch.ops.grouter.expert_mlp(rows, expert_offsets, gate_up_proj, down_proj, gate)[0]
    slices = _slices(expert_offsets, rows.shape[0], gate_up_proj.shape[0])
    return _ExpertMLP.apply(rows, gate_up_proj, down_proj, slices, gate)
