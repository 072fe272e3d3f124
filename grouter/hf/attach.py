"""Fixed routing for a transformers MoE model: a Grouter, or routes given from outside.

`attach(model, g)` hooks the model's base (decoder) module. Each of its forwards routes once —
from `set_routes` if routes were given, else ``g.route(input_ids, attention_mask, cache)`` — and
builds one routing plan; every MoE block's gate then returns those routes (and the plan is
reused by the ``"grouter"`` experts implementation). Routes belong to that one forward: a block
called outside it has none and raises. Activation-checkpoint recomputation, which reruns blocks
during a backward pass, takes the routes of the forward that backward belongs to.
"""

from __future__ import annotations

import types
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from ..nn.routing import checked_routes
from ..nn.transformers_moe import check_gate_call, global_num_experts, moe_blocks
from .attachment import Attachment, attachment_of, save_attached

__all__ = ["attach", "detach", "set_routes"]


def _gate_forward(gate: nn.Module, hidden_states: Tensor, *args, **kwargs):
    # Reaches the attachment through the module, so a deep copy of the model routes by its own copy.
    return gate._grouter_attachment.gate_output(hidden_states)


def _base_of(model: nn.Module, blocks: list) -> nn.Module:
    """The module whose forward embeds the tokens and runs every block: the model's base (decoder)."""
    base = getattr(model, "base_model", model)
    if isinstance(base, nn.Module) and len(moe_blocks(base)) == len(blocks):
        return base
    return model


def attach(model: nn.Module, grouter_model: Any) -> nn.Module:
    """Route every MoE block of `model` by `grouter_model` (or, with None, by `set_routes` only).

    Switches the model to the ``"grouter"`` experts implementation (`detach` restores the previous
    one). The Grouter stays a separate module: not a parameter of the model, never trained with it.
    Returns the model.
    """
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError(f"grouter.hf.attach: {type(model).__name__} has no MoE blocks (modules with experts and a gate)")
    detach(model)
    num_experts = {global_num_experts(b.experts) for _, b, _ in blocks}
    if len(num_experts) != 1:
        raise ValueError(f"grouter.hf.attach: MoE blocks disagree on the number of experts: {sorted(num_experts)}")
    (E,) = num_experts
    if grouter_model is not None:
        _check_grouter(model, blocks, grouter_model, E)
    base = _base_of(model, blocks)
    att = Attachment(model, base, grouter_model, blocks, E)
    att.handles.append(base.register_forward_pre_hook(att.begin, with_kwargs=True))
    att.handles.append(base.register_forward_hook(att.end, with_kwargs=True, always_call=True))
    for _, block, attr in blocks:
        check_gate_call(block, attr, "grouter.hf.attach")
    for _, block, attr in blocks:
        gate = getattr(block, attr)
        gate._grouter_original_forward = gate.forward
        gate._grouter_attachment = block.experts._grouter_attachment = att
        gate.forward = types.MethodType(_gate_forward, gate)
        # The bypassed gate gets no gradient: frozen, so DDP (default arguments) does not wait for
        # one and optimizers leave it as it is. detach restores each parameter's flag.
        for p in gate.parameters(recurse=True):
            att.frozen.append((p, p.requires_grad))
            p.requires_grad_(False)
    if hasattr(model, "set_experts_implementation"):
        att.previous_implementation = getattr(model.config, "_experts_implementation", None)
        model.set_experts_implementation("grouter")
    if hasattr(model, "save_pretrained"):  # the Grouter is saved with the model, never dropped
        model.save_pretrained = types.MethodType(save_attached, model)
    model._grouter_attachment = att
    return model


def _check_grouter(model: nn.Module, blocks: list, g: Any, E: int) -> None:
    if getattr(g, "num_experts", E) != E:
        raise ValueError(f"grouter.hf.attach: the Grouter routes to {g.num_experts} experts, "
                         f"the model has {E}; fold the Grouter first (grouter.fold)")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    g_vocab = getattr(g, "vocab_size", None)
    if vocab is not None and g_vocab is not None and vocab != g_vocab:
        raise ValueError(f"grouter.hf.attach: the Grouter reads a vocabulary of {g_vocab} tokens, the model {vocab}")
    top_ks = {getattr(getattr(b, a), "top_k", None) for _, b, a in blocks} - {None}
    g_k = getattr(g, "top_k", None)
    if g_k is not None and top_ks and top_ks != {g_k}:
        warnings.warn(f"grouter.hf.attach: the model's gates use top-k {sorted(top_ks)}, the Grouter {g_k}; "
                      "the Grouter's k is used", stacklevel=3)


def detach(model: nn.Module) -> nn.Module:
    """Undo `attach`: the learned gates route again. A no-op for a model without an attachment."""
    att = attachment_of(model)
    if att is None:
        return model
    for handle in att.handles:
        handle.remove()
    for p, requires_grad in att.frozen:
        p.requires_grad_(requires_grad)
    for _, block, attr in att.blocks:
        gate = getattr(block, attr)
        if hasattr(gate, "_grouter_original_forward"):
            del gate.forward  # the instance attribute; the class's forward shows again
            del gate._grouter_original_forward
        gate.__dict__.pop("_grouter_attachment", None)
        block.experts.__dict__.pop("_grouter_attachment", None)
    if att.previous_implementation is not None:
        model.set_experts_implementation(att.previous_implementation)
    model.__dict__.pop("save_pretrained", None)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "grouter"):
        del config.grouter
    del model._grouter_attachment
    return model


def set_routes(model: nn.Module, expert_ids: Tensor, weights: Tensor) -> None:
    """Routes for the next forward of the attached `model` (pre-dispatched, or computed elsewhere).

    expert_ids and weights: [B, S, K] or [T, K], covering exactly that forward's tokens (checked
    when it runs) and consumed by it; they take precedence over an attached Grouter.
    """
    att = attachment_of(model)
    if att is None:
        raise RuntimeError("grouter.hf.set_routes: the model is not attached; call grouter.hf.attach(model, None) "
                           "(routes only from outside) or grouter.hf.attach(model, grouter) first")
    ids, w = checked_routes(expert_ids, weights, "grouter.hf.set_routes")
    att.pending = (ids, w)
