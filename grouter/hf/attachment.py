"""The state of an attached model: one `Attachment` per model, shared by attach, the gates, the
experts implementation and saving.

attach.py creates and removes it, persist.py reads it; neither imports the other's module for it.
Saving lives here too because an attached model's own ``model.save_pretrained`` must keep its
Grouter: `save_attached` writes the folder and the marker that `grouter.hf.from_pretrained` reads
(``config.grouter = {"format": MARKER_FORMAT, "path": GROUTER_DIR or None, "checksum": ...}``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Union

import torch
from torch import Tensor, nn

from .. import ops
from ..nn.transformers_moe import gate_output
from ..router.model import Grouter, GrouterCache
from .cache import install, routing_cache

__all__ = ["Attachment", "Routes", "attachment_of", "save_attached", "GROUTER_DIR", "MARKER_FORMAT"]

GROUTER_DIR = "grouter"
MARKER_FORMAT = 1


@dataclass
class Routes:
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
        self.active: List[Routes] = []  # routes of the forwards in progress (innermost last)
        self.last: Optional[Routes] = None  # routes of the last finished forward
        self.replay: Optional[Routes] = None  # routes of the forward whose backward runs now
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
        routes = Routes(ids, weights, logits.reshape(ids.shape[0], -1), ops.routing_plan(ids, self.num_experts), state,
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

    def routes(self) -> Optional[Routes]:
        if self.active:
            return self.active[-1]
        if _in_backward():  # activation checkpointing recomputes blocks in backward
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
        return gate_output(routes.logits.to(hidden_states.dtype), routes.weights.to(hidden_states.dtype), routes.ids)


def _replay(att: Attachment, routes: Routes, grad: Tensor) -> None:
    att.replay = routes


def _device_of(module: Any, default: torch.device) -> torch.device:
    params = getattr(module, "parameters", None)
    first = next(iter(params()), None) if callable(params) else None
    return first.device if first is not None else default


def attachment_of(model: nn.Module) -> Optional[Attachment]:
    return getattr(model, "_grouter_attachment", None)


def _in_backward() -> bool:
    # Whether an autograd backward is running on this thread: torch has no public query for it,
    # and non-reentrant activation checkpointing recomputes blocks only there.
    return torch._C._current_graph_task_id() != -1


def save_attached(model: nn.Module, path: Union[str, Path], *args, **kwargs) -> None:
    """Save an attached `model` (transformers' save_pretrained) with its Grouter in ``path/grouter/``
    and the marker in config.json; also what an attached model's ``model.save_pretrained`` is."""
    att = attachment_of(model)
    if att is None:
        raise RuntimeError("grouter.hf: the model is not attached")
    path = Path(path)
    g = att.grouter
    if g is not None and not isinstance(g, Grouter):
        raise TypeError(f"grouter.hf.save_pretrained: the attached router ({type(g).__name__}) is not saved with a "
                        "model (grouter.hf.from_pretrained loads a Grouter); attach a grouter.Grouter, or save the "
                        "router apart")
    model.config.grouter = dict(format=MARKER_FORMAT, path=GROUTER_DIR if g is not None else None,
                                checksum=g.checksum() if g is not None else None)
    model.config.experts_implementation = "grouter"  # read back by transformers as the implementation to load
    try:
        type(model).save_pretrained(model, path, *args, **kwargs)
    finally:
        del model.config.experts_implementation
    if g is not None:
        g.save(path / GROUTER_DIR)
