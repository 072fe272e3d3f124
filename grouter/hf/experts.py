"""The ``"grouter"`` experts implementation for transformers: permute, expert MLPs, weighted unpermute."""

from __future__ import annotations

import warnings
from typing import Optional

from torch import Tensor, nn

from .. import ops
from ..ops import expert_mlp

__all__ = ["experts_forward", "register"]


def _experts_fallback(module: nn.Module) -> Optional[str]:
    """Why this experts module cannot take the fused path (None when it can)."""
    if not getattr(module, "has_gate", True):
        return "experts without a gate projection"
    if getattr(module, "has_bias", False):
        return "experts with biases"
    if getattr(module, "is_transposed", False):
        return "transposed expert weights"
    if not getattr(module, "is_concatenated", True):
        return "interleaved gate/up weights"
    if getattr(module, "_is_expert_parallel", False):
        return "expert-parallel experts"
    return None


def _gate_fn(module: nn.Module):
    """"silu" (grouter's fused SwiGLU) for the default gate with SiLU; otherwise the module's own gate."""
    from transformers.integrations.moe import _default_apply_gate

    act = getattr(module, "act_fn", None)
    is_silu = isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"
    return "silu" if type(module)._apply_gate is _default_apply_gate and is_silu else module._apply_gate


def experts_forward(self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """The ``"grouter"`` experts implementation: permute, per-expert matmuls, weighted unpermute."""
    reason = _experts_fallback(self)
    if reason is not None:
        from transformers.integrations.moe import grouped_mm_experts_forward

        warnings.warn(f"grouter experts: {reason} run on transformers' grouped_mm, not grouter's kernels", stacklevel=2)
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    attachment = getattr(self, "_grouter_attachment", None)
    plan = attachment.plan_for(top_k_index) if attachment is not None else None
    if plan is None:
        if attachment is None and getattr(self.config, "grouter", None):
            raise RuntimeError("grouter.hf: this model was saved with a Grouter (config.grouter) but runs without "
                               "one; load it with grouter.hf.from_pretrained(path) or grouter.hf.attach a Grouter")
        plan = ops.routing_plan(top_k_index, self.num_experts)
    rows = ops.permute(hidden_states, plan)
    rows = expert_mlp(rows, plan.expert_offsets, self.gate_up_proj, self.down_proj, _gate_fn(self))
    if getattr(self, "has_post_expert_norm", False):
        rows = self.post_expert_norm(rows)
    return ops.unpermute(rows, plan, top_k_weights)


def _eager(self: nn.Module, *args, **kwargs):
    # use_experts_implementation wraps the class's own forward with functools.wraps: that is eager
    return type(self).forward.__wrapped__(self, *args, **kwargs)


def _guarded(implementation):
    """`implementation`, warning once per experts module of a folder saved with a Grouter that runs
    without one: its never-trained gates would route it."""

    def forward(self: nn.Module, *args, **kwargs):
        if (getattr(self, "_grouter_attachment", None) is None and not getattr(self, "_grouter_warned", False)
                and getattr(getattr(self, "config", None), "grouter", None)):
            self._grouter_warned = True
            warnings.warn("grouter.hf: this model was saved with a Grouter (config.grouter) but runs without one, so "
                          "its never-trained gates route it; load it with grouter.hf.from_pretrained(path)",
                          stacklevel=2)
        return implementation(self, *args, **kwargs)

    forward._grouter_guarded = True
    return forward


def register() -> bool:
    """Register ``"grouter"`` in transformers' experts interface (idempotent); False without transformers.

    The other implementations (eager included) are wrapped so that a model saved with a Grouter and
    loaded on one of them without it warns instead of routing silently by its untrained gates."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return False

    if ALL_EXPERTS_FUNCTIONS.get("grouter") is not experts_forward:
        ALL_EXPERTS_FUNCTIONS.register("grouter", experts_forward)
    for name in ["eager"] + [n for n in ALL_EXPERTS_FUNCTIONS if n != "grouter"]:
        current = ALL_EXPERTS_FUNCTIONS.get(name, _eager if name == "eager" else None)
        if current is not None and not getattr(current, "_grouter_guarded", False):
            ALL_EXPERTS_FUNCTIONS.register(name, _guarded(current))
    return True
