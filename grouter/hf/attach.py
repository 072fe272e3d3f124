"""Fixed routing for a transformers MoE model: a Grouter, or routes given from outside.

`attach(model, g)` hooks the model's base (decoder) module. Each of its forwards routes once —
from `set_routes` if routes were given, else ``g.route(input_ids, attention_mask, cache)`` — and
builds one routing plan; every MoE block's gate then returns those routes (and the plan is
reused by the ``"grouter"`` experts implementation). Routes belong to that one forward: a block
called outside it has none and raises. Activation-checkpoint recomputation, which reruns blocks
during a backward pass, takes the routes of the forward that backward belongs to.
"""

from __future__ import annotations

import functools
import inspect
import re
import types
import warnings
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
from torch import Tensor, nn

from .. import ops
from ..nn.blocks import moe_blocks
from ..nn.routing import flatten_routing
from ..router.model import Grouter, GrouterCache
from .cache import install, routing_cache

__all__ = ["attach", "detach", "set_routes", "attachment_of"]

@dataclass
class _Routes:
    """The routes of one forward: ids and weights [T, K], the router logits the gates report [T, E], the plan."""

    ids: Tensor
    weights: Tensor
    logits: Tensor
    plan: ops.RoutingPlan
    routing_cache: Any = None  # a GrouterCache to keep on the cache the forward returns
    ids_version: int = 0  # ids._version when planned (where tracked)


class Attachment:
    """What `attach` added to a model; reachable as ``model._grouter_attachment``."""

    def __init__(self, model: nn.Module, base: nn.Module, grouter: Any, blocks: list, num_experts: int):
        self.model, self.base, self.grouter, self.blocks, self.num_experts = model, base, grouter, blocks, num_experts
        self.pending: Optional[tuple] = None  # (ids, weights) from set_routes, for the next forward
        self.active: List[_Routes] = []  # routes of the forwards in progress (innermost last)
        self.last: Optional[_Routes] = None  # routes of the last finished forward
        self.replay: Optional[_Routes] = None  # routes of the forward whose backward runs now
        self.handles: list = []
        self.previous_implementation: Optional[str] = None
        self.frozen: List[tuple] = []  # (gate parameter, its requires_grad before attach)

    # --- one forward ------------------------------------------------------------------------------

    def begin(self, _module, args, kwargs) -> None:
        input_ids = kwargs.get("input_ids")
        if input_ids is None and args and isinstance(args[0], Tensor) and not args[0].is_floating_point():
            input_ids = args[0]
        embeds = kwargs.get("inputs_embeds")
        shape = input_ids.shape if input_ids is not None else (embeds.shape[:-1] if embeds is not None else None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if self.pending is not None:
            ids, weights = self.pending
            self.pending = None
            tokens = None if shape is None else int(torch.Size(shape).numel())
            if tokens is not None and ids.shape[0] != tokens:
                raise ValueError(f"grouter.hf.set_routes: the routes cover {ids.shape[0]} tokens, this forward has "
                                 f"{tokens} ({tuple(shape)})")
            device = (input_ids if input_ids is not None else embeds).device if shape is not None else ids.device
            ids, weights, logits, state = ids.to(device), weights.to(device), None, None
        elif self.grouter is None:
            raise RuntimeError("grouter.hf: the model was attached without a Grouter (attach(model, None)); call "
                               "grouter.hf.set_routes(model, ids, weights) before each forward")
        else:
            if input_ids is None:
                raise RuntimeError("grouter.hf: an attached Grouter routes from input_ids; this call passed none "
                                   "(pass input_ids, or give routes with grouter.hf.set_routes)")
            ids, weights, logits, state = self._route(input_ids, kwargs.get("attention_mask"), cache, kwargs)
        k = ids.shape[-1]
        ids, weights = ids.reshape(-1, k).long(), weights.reshape(-1, k)
        if logits is None:  # routes from outside: logits whose softmax is the gate weights on the chosen experts
            logits = torch.full((ids.shape[0], self.num_experts), -1e4, dtype=torch.float32, device=ids.device)
            logits = logits.scatter(1, ids, weights.float().clamp_min(1e-30).log())
        routes = _Routes(ids, weights, logits.reshape(ids.shape[0], -1), ops.routing_plan(ids, self.num_experts), state,
                         0 if torch.compiler.is_compiling() or ids.is_inference() else ids._version)
        self.active.append(routes)

    def _route(self, input_ids: Tensor, attention_mask, cache, kwargs):
        """(ids, weights, logits, a new routing cache to keep on the cache this forward creates)."""
        device = _device_of(self.grouter, input_ids.device)
        if not isinstance(self.grouter, Grouter):  # any router object whose routes are per token
            ids, w = self.grouter.route(input_ids.to(device))
            return ids.to(input_ids.device), w.to(input_ids.device), None, None
        if attention_mask is not None and (not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2):
            got = f"{attention_mask.dim()}-D" if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
            raise ValueError(f"grouter.hf: the Grouter reads a 2-D attention_mask [batch, positions], this forward got "
                             f"a {got} one (static and compiled caches build 4-D masks: use a dynamic cache)")
        state = keep = None
        if not self.grouter.causal:
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError("grouter.hf: a bidirectional Grouter (causal=False) cannot route cached generation: "
                                 "its routes of earlier tokens change with every new token; generate with "
                                 "use_cache=False, or use a causal Grouter")
        else:
            state = routing_cache(cache)
            if state is None and cache is None and self._will_cache(kwargs):
                state = keep = GrouterCache()  # the model makes its cache inside this forward; ours joins it after
        mask = None if attention_mask is None else attention_mask.to(device)
        ids, w, logits = self.grouter.route(input_ids.to(device), mask, state, return_logits=True)
        dev = input_ids.device
        return ids.to(dev), w.to(dev), logits.to(dev), keep

    def _will_cache(self, kwargs) -> bool:
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(getattr(self.base, "config", None), "use_cache", False)
        return bool(use_cache) and not (self.base.training and torch.is_grad_enabled())

    def end(self, _module, args, kwargs, output) -> None:
        routes = self.active.pop() if self.active else None
        self.last = routes
        if routes is None or output is None:
            return
        hidden = getattr(output, "last_hidden_state", None)
        if isinstance(hidden, Tensor) and hidden.requires_grad and not torch.compiler.is_compiling():
            # The backward of this forward starts at its output: from then on, blocks that activation
            # checkpointing recomputes take this forward's routes, whatever ran since.
            hidden.register_hook(functools.partial(_replay, self, routes))
        if routes.routing_cache is None:
            return
        cache = getattr(output, "cache", None)
        if cache is None:
            cache = getattr(output, "past_key_values", None)
        if cache is not None and hasattr(cache, "get_seq_length"):
            install(cache, routes.routing_cache)

    # --- what the blocks see ----------------------------------------------------------------------

    def routes(self) -> Optional[_Routes]:
        if self.active:
            return self.active[-1]
        if torch._C._current_graph_task_id() != -1:  # activation checkpointing recomputes blocks in backward
            return self.replay or self.last
        return None

    def plan_for(self, expert_ids: Tensor) -> Optional[ops.RoutingPlan]:
        """The plan of this forward's routes when the block passes on the very ids the gate
        returned, unmodified (same tensor, same version counter: an in-place edit by the block
        bumps it), else None: the caller plans what it was given. Never a lookup across forwards:
        the routes belong to this forward and go with it."""
        routes = self.routes()
        if routes is None or expert_ids is not routes.ids:
            return None
        unchanged = torch.compiler.is_compiling() or expert_ids.is_inference() or \
            expert_ids._version == routes.ids_version
        return routes.plan if unchanged else None

    def gate_output(self, hidden_states: Tensor):
        routes = self.routes()
        if routes is None:
            raise RuntimeError(f"grouter.hf: this MoE block ran outside a forward of the attached "
                               f"{type(self.base).__name__}, so it has no routes (routes belong to one forward of "
                               "the model); call the model itself")
        tokens = hidden_states.numel() // hidden_states.shape[-1]
        if tokens != routes.ids.shape[0]:
            raise RuntimeError(f"grouter.hf: the MoE block sees {tokens} tokens, the routes cover {routes.ids.shape[0]}")
        return routes.logits.to(hidden_states.dtype), routes.weights.to(hidden_states.dtype), routes.ids


def _replay(att: Attachment, routes: _Routes, grad: Tensor) -> None:
    att.replay = routes


def _global_num_experts(experts: nn.Module) -> int:
    """The model's expert count. transformers' expert parallelism (DistributedConfig(ep_size=...))
    sets `num_experts` to the rank's local count and shards the weights as DTensors of the global
    shape: routes name global experts, which its dispatch maps to the ranks."""
    if getattr(experts, "_is_expert_parallel", False):
        return int(experts.gate_up_proj.shape[0])
    return experts.num_experts


def _gate_forward(gate: nn.Module, hidden_states: Tensor, *args, **kwargs):
    # Reaches the attachment through the module, so a deep copy of the model routes by its own copy.
    return gate._grouter_attachment.gate_output(hidden_states)


def _device_of(module: Any, default: torch.device) -> torch.device:
    params = getattr(module, "parameters", None)
    first = next(iter(params()), None) if callable(params) else None
    return first.device if first is not None else default


def attachment_of(model: nn.Module) -> Optional[Attachment]:
    return getattr(model, "_grouter_attachment", None)


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
    num_experts = {_global_num_experts(b.experts) for _, b, _ in blocks}
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
        _check_gate_call(block, attr)
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
    if hasattr(model, "save_pretrained"):
        from .persist import save_pretrained

        model.save_pretrained = types.MethodType(save_pretrained, model)
    model._grouter_attachment = att
    return model


_GATE_CALL = re.compile(r"^\s*([\w\s,]+?)\s*=\s*self\.(\w+)\(", re.M)


def _check_gate_call(block: nn.Module, attr: str) -> None:
    """Raise unless the block unpacks its gate as (logits, weights, ids), what an attached gate returns."""
    try:
        source = inspect.getsource(type(block).forward)
    except (OSError, TypeError):
        return  # no source to read (compiled, generated): trust the common convention
    for lhs, name in _GATE_CALL.findall(source):
        if name != attr:
            continue
        names = [n.strip() for n in lhs.split(",")]
        if len(names) != 3 or not (names[0] == "_" or "logit" in names[0]):
            raise ValueError(f"grouter.hf.attach: {type(block).__name__} unpacks its {attr} as ({', '.join(names)}); "
                             "grouter attaches to MoE blocks whose gate returns (logits, weights, ids)")


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
    if expert_ids.dtype.is_floating_point or expert_ids.dtype == torch.bool:
        raise ValueError(f"grouter.hf.set_routes: expert ids must be an integer tensor, got {expert_ids.dtype}")
    if not weights.dtype.is_floating_point:
        raise ValueError(f"grouter.hf.set_routes: weights must be a floating-point tensor, got {weights.dtype}")
    ids, w = flatten_routing(expert_ids, weights)
    # Gate weights are a distribution's mass: negative, NaN or infinite ones are a caller's bug
    # that would otherwise mix expert outputs with it silently (one check, one host sync).
    if w.numel() and not bool((torch.isfinite(w) & (w >= 0)).all()):
        bad = w[~(torch.isfinite(w) & (w >= 0))]
        raise ValueError(f"grouter.hf.set_routes: gate weights must be finite and non-negative, got "
                         f"{bad.flatten()[:4].tolist()}{' ...' if bad.numel() > 4 else ''}")
    att.pending = (ids, w)
