"""The Grouter's routing cache, kept beside a transformers cache and following it.

During cached generation a decode call carries only the new tokens; routing them from their whole
prefix needs the Grouter's own keys and values. They live on the model's cache object itself (as
``cache.grouter_cache``), so they begin, end and travel with it: a new cache starts a new prefill,
and the cache operations generation strategies use (beam reorder, batch selection and repetition,
crop, reset) are applied to both. A cache whose tokens the Grouter did not route raises.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch

from ..router.model import GrouterCache

__all__ = ["routing_cache", "install"]

_ATTR = "grouter_cache"


def routing_cache(cache: Any) -> Optional[GrouterCache]:
    """The GrouterCache that continues `cache` (a transformers Cache), ready for this forward's tokens."""
    if cache is None:
        return None
    if not hasattr(cache, "get_seq_length"):
        raise TypeError(f"grouter.hf: cannot route with a {type(cache).__name__} cache (no get_seq_length)")
    past = cache.get_seq_length()
    state = getattr(cache, _ATTR, None)
    if past == 0:
        if state is None:
            state = install(cache, GrouterCache())
        state.reset()
        return state
    if state is None:
        raise RuntimeError(f"grouter.hf: the model's cache holds {past} tokens that the Grouter did not route (it was "
                           "filled before attach, or from routes given with set_routes); start from an empty cache")
    if state.length != past:
        raise RuntimeError(f"grouter.hf: the model's cache holds {past} tokens, the Grouter's routing cache "
                           f"{state.length}; the cache was changed in a way grouter does not follow, or a forward "
                           "took routes from set_routes; start from an empty cache")
    return state


def install(cache: Any, state: GrouterCache) -> GrouterCache:
    """Keep `state` on `cache` and make the cache's batch and length operations apply to it too."""
    setattr(cache, _ATTR, state)
    if getattr(cache, "_grouter_wrapped", False):
        return state
    cache._grouter_wrapped = True

    def follow(name, apply):
        original = getattr(cache, name, None)
        if original is None:
            return

        @functools.wraps(original)
        def wrapped(*args, **kwargs):
            out = original(*args, **kwargs)  # the model's cache first: if it refuses, nothing changes
            apply(getattr(cache, _ATTR), *args, **kwargs)
            return out

        setattr(cache, name, wrapped)

    follow("reorder_cache", lambda s, beam_idx: s.reorder(beam_idx))
    follow("batch_select_indices", lambda s, indices: s.reorder(_as_index(indices, s)))
    follow("batch_repeat_interleave", lambda s, repeats: s.repeat_interleave(repeats))
    follow("crop", lambda s, *a, **k: s.crop(cache.get_seq_length()))
    follow("reset", lambda s: s.reset())
    return state


def _as_index(indices, state: GrouterCache):
    index = torch.as_tensor(indices, device=state.key_mask.device if state.key_mask is not None else None)
    if index.dtype == torch.bool:
        index = index.nonzero().flatten()
    return index
