"""The compiled dispatch ops (``torch.ops.grouter.*``): routing_plan, permute, unpermute, coactivation
and glu, with Python wrappers, fake tensors and autograd.

``routing_plan`` sorts the T*K (token, k) slots of a top-k routing by expert once; ``permute``,
``unpermute`` and the autograd formulas then only follow its ``row_of`` indices. The kernels live
in ``csrc/`` and validate their inputs (ids in range, no expert twice per token, a real plan), so
a bad input raises ``ValueError``/``IndexError`` rather than touching memory it should not.
"""

from __future__ import annotations

import operator
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import _C  # loads the library that registers torch.ops.grouter.*
from .activations import GLU_ACTIVATIONS

__all__ = [
    "RoutingPlan", "routing_plan", "permute", "unpermute", "coactivation", "glu", "GLU_ACTIVATIONS",
    "set_cpu_output_cache_limit", "cpu_output_cache_limit", "cpu_output_cache_bytes", "empty_cpu_output_cache",
    "set_cuda_checks", "cuda_checks_enabled", "has_cuda_kernels",
]

_ops = torch.ops.grouter

# Large CPU outputs of permute/unpermute (and their gradients) are recycled: a fresh multi-MiB
# tensor costs more in first-touch page faults than the op's copy. The cache holds at most
# GROUTER_CPU_CACHE_MB (default 1024) MiB of freed blocks; 0 disables it.
set_cpu_output_cache_limit = _C.set_cpu_output_cache_limit
cpu_output_cache_limit = _C.cpu_output_cache_limit
cpu_output_cache_bytes = _C.cpu_output_cache_bytes
empty_cpu_output_cache = _C.empty_cpu_output_cache

# On CUDA, index inputs are validated before each op by default: a bad expert id or a corrupt
# plan raises IndexError/ValueError, at the price of one small device-to-host copy (a sync) per
# op. set_cuda_checks(False) or GROUTER_CUDA_CHECKS=0 skips that; the kernels still bounds-check
# every index, so bad input can then give a wrong result but never touch memory out of bounds.
set_cuda_checks = _C.set_cuda_checks
cuda_checks_enabled = _C.cuda_checks_enabled


def has_cuda_kernels() -> bool:
    """Whether this build of grouter has its CUDA backend compiled in."""
    return bool(_C.with_cuda)


class RoutingPlan(NamedTuple):
    """Where every (token, k) slot of a top-k routing goes in the expert-major permuted tensor.

    sorted_tokens: int32 [T*K], the source token of each permuted row.
    row_of:        int32 [T, K], the permuted row of slot (t, k).
    expert_offsets: int64 [E+1], rows of expert e are expert_offsets[e]:expert_offsets[e+1].
    """

    sorted_tokens: Tensor
    row_of: Tensor
    expert_offsets: Tensor

    @property
    def num_experts(self) -> int:
        return self.expert_offsets.shape[0] - 1

    @property
    def top_k(self) -> int:
        return self.row_of.shape[1]

    def tokens_per_expert(self) -> Tensor:
        """int64 [E]: rows of each expert."""
        return self.expert_offsets.diff()


# The largest expert counts the ops accept: the plan's offsets take 8 (E + 1) bytes and
# coactivation's output 8 E^2 bytes; anything larger is a mistake, not a model (128 MiB / 8 GiB).
MAX_EXPERTS = 1 << 24
MAX_COACTIVATION_EXPERTS = 1 << 15


def _num_experts(num_experts, limit: int = MAX_EXPERTS, op: str = "routing_plan") -> int:
    try:
        if isinstance(num_experts, bool):
            raise TypeError
        n = operator.index(num_experts)
    except TypeError:
        raise ValueError(f"grouter.{op}: num_experts must be an int, got {num_experts!r}") from None
    if not 1 <= n <= limit:
        raise ValueError(f"grouter.{op}: num_experts must be in [1, {limit}], got {n}")
    return n


def _tensor(op: str, name: str, t) -> Tensor:
    if not isinstance(t, Tensor):
        raise ValueError(f"grouter.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise ValueError(f"grouter.{op}: {name} must be a dense (strided) tensor, got layout {t.layout}")
    return t


def _row_of(plan) -> Tensor:
    row_of = getattr(plan, "row_of", None)
    if not isinstance(row_of, Tensor):
        raise TypeError(f"expected a RoutingPlan (from grouter.ops.routing_plan), got {type(plan).__name__}")
    return row_of


def routing_plan(expert_ids: Tensor, num_experts: int) -> RoutingPlan:
    """Plan the expert-major permutation of a top-k routing ``expert_ids`` [T, K] (int32/int64).

    Rows are grouped by expert and, inside an expert, in ascending (t, k) order: deterministic.
    """
    expert_ids = _tensor("routing_plan", "expert_ids", expert_ids)
    return RoutingPlan(*_ops.routing_plan(expert_ids, _num_experts(num_experts)))


def permute(x: Tensor, plan: RoutingPlan) -> Tensor:
    """``out[plan.row_of[t, k]] = x[t]``: [T, H] -> [T*K, H], rows grouped by expert."""
    return _ops.permute(_tensor("permute", "x", x), _row_of(plan))


def unpermute(y: Tensor, plan: RoutingPlan, weights: Optional[Tensor] = None) -> Tensor:
    """``out[t] = sum_k weights[t, k] * y[plan.row_of[t, k]]``: [T*K, H] -> [T, H].

    Summed in k order in fp32 (fp64 when y or weights are fp64); ``weights=None`` means 1.
    Bitwise reproducible, gradients included.
    """
    if weights is not None:
        weights = _tensor("unpermute", "weights", weights)
    return _ops.unpermute(_tensor("unpermute", "y", y), _row_of(plan), weights)


def coactivation(expert_ids: Tensor, num_experts: int) -> Tensor:
    """int64 [E, E]: ``C[i, j]`` tokens routed to both i and j, ``C[i, i]`` tokens routed to i."""
    expert_ids = _tensor("coactivation", "expert_ids", expert_ids)
    return _ops.coactivation(expert_ids, _num_experts(num_experts, MAX_COACTIVATION_EXPERTS, "coactivation"))


# ---------------------------------------------------------------------------------------------
# Fake (meta) implementations: shapes and dtypes only, for torch.compile and opcheck. They
# repeat the shape checks so a traced program fails where the eager one would.


def glu(h: Tensor, activation: str = "silu") -> Tensor:
    """a = act(gate) * up for h = [gate | up] of shape [..., 2I] -> [..., I] (SwiGLU for "silu"),
    in one pass, fp32 math for float32/bfloat16/float16 rows; differentiable (one fused backward)."""
    return _ops.glu(h, activation)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


_ACTIVATION_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _check_ids(op: str, ids: Tensor, num_experts: int) -> None:
    _check(num_experts >= 1, f"grouter.{op}: num_experts must be >= 1, got {num_experts}")
    _check(ids.dim() == 2, f"grouter.{op}: expert_ids must be 2-D [T, K], got shape {tuple(ids.shape)}")
    _check(ids.dtype in (torch.int32, torch.int64), f"grouter.{op}: expert_ids must be int32 or int64, got {ids.dtype}")
    _check(ids.shape[1] <= num_experts, f"grouter.{op}: top-k K={ids.shape[1]} exceeds num_experts={num_experts}")


def _check_devices(op: str, *tensors) -> None:
    # The dispatcher runs these fake kernels when any input is on the meta device; mixed with real
    # tensors that would return an uninitialised real tensor instead of an error.
    devices = {t.device for t in tensors if t is not None}
    _check(len(devices) <= 1, f"grouter.{op}: inputs are on different devices: {sorted(map(str, devices))}")


def _check_rows(op: str, t: Tensor, name: str, row_of: Tensor, rows) -> None:
    _check(t.dim() == 2, f"grouter.{op}: {name} must be 2-D, got shape {tuple(t.shape)}")
    _check(t.dtype in _ACTIVATION_DTYPES, f"grouter.{op}: {name} must be a float dtype, got {t.dtype}")
    _check(row_of.dim() == 2 and row_of.dtype == torch.int32, f"grouter.{op}: row_of must be int32 [T, K]")
    _check(t.shape[0] == rows, f"grouter.{op}: {name} has {t.shape[0]} rows, the plan needs {rows}")


def _check_weights(op: str, weights: Optional[Tensor], row_of: Tensor) -> None:
    if weights is None:
        return
    _check(weights.shape == row_of.shape, f"grouter.{op}: weights must have shape {tuple(row_of.shape)}")
    _check(weights.dtype in _ACTIVATION_DTYPES, f"grouter.{op}: weights must be a float dtype, got {weights.dtype}")


@torch.library.register_fake("grouter::routing_plan")
def _routing_plan_fake(expert_ids, num_experts):
    _check_ids("routing_plan", expert_ids, num_experts)
    T, K = expert_ids.shape
    return (
        expert_ids.new_empty(T * K, dtype=torch.int32),
        expert_ids.new_empty(T, K, dtype=torch.int32),
        expert_ids.new_empty(num_experts + 1, dtype=torch.int64),
    )


@torch.library.register_fake("grouter::permute")
def _permute_fake(x, row_of):
    _check_devices("permute", x, row_of)
    _check_rows("permute", x, "x", row_of, row_of.shape[0])
    return x.new_empty(row_of.shape[0] * row_of.shape[1], x.shape[1])


@torch.library.register_fake("grouter::unpermute")
def _unpermute_fake(y, row_of, weights):
    _check_devices("unpermute", y, row_of, weights)
    _check_rows("unpermute", y, "y", row_of, row_of.shape[0] * row_of.shape[1])
    _check_weights("unpermute", weights, row_of)
    return y.new_empty(row_of.shape[0], y.shape[1])


@torch.library.register_fake("grouter::unpermute_backward")
def _unpermute_backward_fake(grad_out, row_of, weights, y):
    _check_devices("unpermute_backward", grad_out, row_of, weights, y)
    _check_rows("unpermute_backward", grad_out, "grad_out", row_of, row_of.shape[0])
    _check_weights("unpermute_backward", weights, row_of)
    grad_y = grad_out.new_empty(row_of.shape[0] * row_of.shape[1], grad_out.shape[1])
    if weights is None or y is None:
        return grad_y, grad_out.new_empty(0)
    return grad_y, weights.new_empty(row_of.shape)


@torch.library.register_fake("grouter::coactivation")
def _coactivation_fake(expert_ids, num_experts):
    _check_ids("coactivation", expert_ids, num_experts)
    return expert_ids.new_empty(num_experts, num_experts, dtype=torch.int64)


def _check_glu(op: str, h: Tensor, activation: str) -> None:
    _check(h.dim() >= 1 and h.shape[-1] % 2 == 0,
           f"grouter.{op}: h must end in an even dimension [..., 2 * I] (gate | up), got shape {tuple(h.shape)}")
    _check(h.dtype in (torch.float32, torch.bfloat16, torch.float16),
           f"grouter.{op}: h must be float32, bfloat16 or float16, got {h.dtype}")
    _check(activation in GLU_ACTIVATIONS,
           f"grouter.glu: unknown activation '{activation}' (have {', '.join(GLU_ACTIVATIONS)})")


@torch.library.register_fake("grouter::glu")
def _glu_fake(h, activation):
    _check_glu("glu", h, activation)
    return h.new_empty(*h.shape[:-1], h.shape[-1] // 2)


@torch.library.register_fake("grouter::glu_backward")
def _glu_backward_fake(grad_a, h, activation):
    _check_devices("glu_backward", grad_a, h)
    _check_glu("glu_backward", h, activation)
    _check(grad_a.shape == (*h.shape[:-1], h.shape[-1] // 2) and grad_a.dtype == h.dtype,
           f"grouter.glu_backward: grad_a must be {(*h.shape[:-1], h.shape[-1] // 2)} {h.dtype} (the shape of a)")
    return torch.empty_like(grad_a), torch.empty_like(h)


# ---------------------------------------------------------------------------------------------
# Autograd. permute's backward is an unweighted unpermute (a gather-sum over each token's K rows)
# and unpermute's is one fused pass giving grad_y and grad_weights: no scatter-add, no atomics.


def _permute_setup(ctx, inputs, output):
    _, row_of = inputs
    ctx.save_for_backward(row_of)


def _permute_backward(ctx, grad):
    (row_of,) = ctx.saved_tensors
    return _ops.unpermute(grad, row_of, None), None


def _unpermute_setup(ctx, inputs, output):
    y, row_of, weights = inputs
    # y is only needed for grad_weights; keeping it alive otherwise would waste memory.
    keep_y = weights is not None and weights.requires_grad
    ctx.save_for_backward(row_of, weights, y if keep_y else None)


def _unpermute_backward(ctx, grad):
    row_of, weights, y = ctx.saved_tensors
    need_y, _, need_w = ctx.needs_input_grad
    grad_y, grad_w = _ops.unpermute_backward(grad, row_of, weights, y if need_w else None)
    return (grad_y if need_y else None), None, (grad_w if need_w else None)


def _glu_setup(ctx, inputs, output):
    h, activation = inputs
    ctx.save_for_backward(h)
    ctx.activation = activation


def _glu_backward(ctx, grad):
    (h,) = ctx.saved_tensors
    return _ops.glu_backward(grad.to(h.dtype), h, ctx.activation)[1], None


torch.library.register_autograd("grouter::permute", _permute_backward, setup_context=_permute_setup)
torch.library.register_autograd("grouter::glu", _glu_backward, setup_context=_glu_setup)
torch.library.register_autograd("grouter::unpermute", _unpermute_backward, setup_context=_unpermute_setup)


def no_double_backward(op: str):
    def backward(ctx, *grads):
        raise RuntimeError(f"grouter.{op}: second derivatives are not implemented (differentiating its "
                           "backward, e.g. a gradient penalty through a MoE layer, is not supported)")
    return backward


# Without a formula autograd would treat the backward ops as constants: silently zero second derivatives.
for _op, _name in (("unpermute_backward", "unpermute"), ("glu_backward", "glu")):
    torch.library.register_autograd(f"grouter::{_op}", no_double_backward(_name),
                                    setup_context=lambda ctx, inputs, output: None)
