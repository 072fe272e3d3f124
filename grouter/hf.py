"""grouter inside transformers (v5) MoE models.

`import grouter.hf` registers ``"grouter"`` in transformers' experts interface, so any model whose
experts class uses ``@use_experts_implementation`` runs on the compiled ops with
``model.set_experts_implementation("grouter")`` or ``from_pretrained(..., experts_implementation=
"grouter")``.

`attach(model, grouter_model)` makes every MoE block route by ``grouter_model.route(input_ids)``,
computed once per forward from the model's ``input_ids``; the learned gates are bypassed (they
return constant logits, so their aux loss carries no gradient), and the routing plan is built
once and shared by all layers. `detach(model)` restores the learned routing.
"""

from __future__ import annotations

import types
import warnings
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .nn.experts import expert_mlp, glu
from .nn.routing import plan_for
from . import ops

__all__ = ["register", "experts_forward", "attach", "detach", "moe_blocks"]


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
    """grouter's fused SwiGLU for the default gate with SiLU; otherwise the module's own gate."""
    from transformers.integrations.moe import _default_apply_gate

    act = getattr(module, "act_fn", None)
    is_silu = isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"
    return glu if type(module)._apply_gate is _default_apply_gate and is_silu else module._apply_gate


def experts_forward(self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """The ``"grouter"`` experts implementation: permute, per-expert matmuls, weighted unpermute."""
    reason = _experts_fallback(self)
    if reason is not None:
        from transformers.integrations.moe import grouped_mm_experts_forward

        warnings.warn(f"grouter experts: {reason} are not supported; using transformers' grouped_mm", stacklevel=2)
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    # The same ids tensor in every layer (an attached Grouter) reuses one plan for all of them.
    plan = plan_for(top_k_index, self.num_experts)
    rows = ops.permute(hidden_states, plan)
    rows = expert_mlp(rows, plan.expert_offsets, self.gate_up_proj, self.down_proj, _gate_fn(self))
    if getattr(self, "has_post_expert_norm", False):
        rows = self.post_expert_norm(rows)
    return ops.unpermute(rows, plan, top_k_weights)


def register() -> None:
    """Register ``"grouter"`` in transformers' experts interface (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if ALL_EXPERTS_FUNCTIONS.get("grouter") is not experts_forward:
        ALL_EXPERTS_FUNCTIONS.register("grouter", experts_forward)


# ---------------------------------------------------------------------------------------------
# Fixed routing from a Grouter.

_GATE_NAMES = ("gate", "router")


def moe_blocks(model: nn.Module) -> list:
    """(name, block, gate attribute) of every MoE block: a module with routed `experts` and a gate."""
    from .nn.moe import MoE

    found = []
    for name, module in model.named_modules():
        if isinstance(module, MoE):  # grouter's own layer takes its routing as an argument
            continue
        experts = getattr(module, "experts", None)
        if not isinstance(experts, nn.Module) or not hasattr(experts, "gate_up_proj"):
            continue
        for attr in _GATE_NAMES:
            if isinstance(getattr(module, attr, None), nn.Module):
                found.append((name, module, attr))
                break
    return found


class _Routes:
    """Routes of the current forward, shared by the hook that computes them and every gate."""

    def __init__(self, grouter_model: Any, num_experts: int):
        self.grouter_model, self.num_experts = grouter_model, num_experts
        self.ids: Optional[Tensor] = None
        self.weights: Optional[Tensor] = None
        self.logits: Optional[Tensor] = None

    def compute(self, input_ids: Tensor) -> None:
        with torch.no_grad():
            ids, w = self.grouter_model.route(input_ids)
        k = ids.shape[-1]
        self.ids = ids.reshape(-1, k).long()
        self.weights = w.reshape(-1, k)
        self.logits = None

    def for_gate(self, hidden_states: Tensor):
        if self.ids is None:
            raise RuntimeError("grouter.hf: routes are computed from input_ids; call the model with input_ids")
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1]).shape[0]
        if tokens != self.ids.shape[0]:
            raise RuntimeError(f"grouter.hf: the MoE block sees {tokens} tokens, the routes cover {self.ids.shape[0]}")
        if self.logits is None or self.logits.dtype != hidden_states.dtype:
            # Constant logits: a model computing its aux loss from them gets no gradient from it.
            self.logits = hidden_states.new_zeros(tokens, self.num_experts)
        return self.logits, self.weights.to(hidden_states.dtype), self.ids


def _input_ids_of(args, kwargs) -> Optional[Tensor]:
    ids = kwargs.get("input_ids")
    if ids is None and args and isinstance(args[0], Tensor) and not args[0].is_floating_point():
        ids = args[0]
    return ids


def attach(model: nn.Module, grouter_model: Any) -> nn.Module:
    """Route every MoE block of `model` by ``grouter_model.route(input_ids)``; returns the model."""
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError(f"grouter.hf.attach: {type(model).__name__} has no MoE blocks (modules with experts and a gate)")
    detach(model)
    num_experts = {b.experts.num_experts for _, b, _ in blocks}
    if len(num_experts) != 1:
        raise ValueError(f"grouter.hf.attach: MoE blocks disagree on the number of experts: {sorted(num_experts)}")
    (E,) = num_experts
    if getattr(grouter_model, "num_experts", E) != E:
        raise ValueError(f"grouter.hf.attach: the Grouter routes to {grouter_model.num_experts} experts, "
                         f"the model has {E}; fold the Grouter first (grouter.fold)")
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    g_vocab = getattr(grouter_model, "vocab_size", None)
    if vocab is not None and g_vocab is not None and vocab != g_vocab:
        raise ValueError(f"grouter.hf.attach: the Grouter reads a vocabulary of {g_vocab} tokens, the model {vocab}")
    top_ks = {getattr(getattr(b, a), "top_k", None) for _, b, a in blocks} - {None}
    g_k = getattr(grouter_model, "top_k", None)
    if g_k is not None and top_ks and top_ks != {g_k}:
        warnings.warn(f"grouter.hf.attach: the model's gates use top-k {sorted(top_ks)}, the Grouter {g_k}; "
                      "the Grouter's k is used", stacklevel=2)

    routes = _Routes(grouter_model, E)

    def capture(_module, args, kwargs):
        input_ids = _input_ids_of(args, kwargs)
        if input_ids is None:
            raise RuntimeError("grouter.hf: an attached Grouter routes from input_ids; this call passed none")
        routes.compute(input_ids)

    handle = model.register_forward_pre_hook(capture, with_kwargs=True)
    for _, block, attr in blocks:
        gate = getattr(block, attr)
        gate._grouter_original_forward = gate.forward
        gate.forward = types.MethodType(lambda self, hidden_states, *a, **k: routes.for_gate(hidden_states), gate)
    model._grouter_attachment = (handle, blocks, routes)
    return model


def detach(model: nn.Module) -> nn.Module:
    """Undo `attach`: the learned gates route again. A no-op for a model without an attachment."""
    attachment = getattr(model, "_grouter_attachment", None)
    if attachment is None:
        return model
    handle, blocks, _ = attachment
    handle.remove()
    for _, block, attr in blocks:
        gate = getattr(block, attr)
        if hasattr(gate, "_grouter_original_forward"):
            del gate.forward  # the instance attribute; the class's forward shows again
            del gate._grouter_original_forward
    del model._grouter_attachment
    return model


register()
