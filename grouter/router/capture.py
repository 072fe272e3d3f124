"""Reading a source MoE at one layer: its router logits and the experts its block really chose.

The logits come from the router (gate) module's output; the choice is what the block hands its
experts module (transformers v5 blocks call ``experts(hidden, top_k_index, top_k_weights)``), so it
is the family's own selection with its bias and group limits, whatever the router computes. The
source's forward stops there: the experts of that layer and the layers above never run.
"""

from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor, nn

from ..nn.moe import MoE
from ..nn.transformers_moe import chosen_ids, gate_logits, moe_blocks
from .source_rule import RouterRule, choice_of, rule_of

__all__ = ["SourceCapture", "check_choice"]

# Up to this fraction of tokens may differ from the recomputed choice: exact ties, which topk may
# break either way.
_TIE_TOLERANCE = 1e-3


class _Captured(Exception):
    """Stops the source's forward right after the distilled layer's choice was made."""


class SourceCapture:
    """Context manager on MoE layer `layer` of `source`; `run(tokens)` -> (logits [T, E], chosen ids [T, K]).

    Sources: transformers MoE models (blocks with routed `experts` and a `gate`/`router`) and models
    built from `grouter.nn.MoE` layers with a learned router. `rule` is the router's rule
    (`grouter.router.source_rule`).
    """

    def __init__(self, source: nn.Module, layer: int = 0):
        hf = moe_blocks(source)
        ours = [m for m in source.modules() if isinstance(m, MoE) and m.router is not None]
        if hf:
            gates = [(getattr(block, attr), block.experts) for _, block, attr in hf]
        elif ours:
            gates = [(m.router, None) for m in ours]
        else:
            raise ValueError(f"distill: {type(source).__name__} has no MoE layer with a learned router")
        if not -len(gates) <= layer < len(gates):
            raise ValueError(f"distill: layer={layer}, but the source has {len(gates)} MoE layers")
        self.source = source
        self.gate, self.experts = gates[layer]
        self.rule: RouterRule = rule_of(self.gate)
        self.logits: Optional[Tensor] = None
        self.ids: Optional[Tensor] = None
        self._handles: list = []

    def __enter__(self):
        def gate_hook(module, args, out):
            if self.experts is None:  # grouter.nn routers return (ids, weights) and keep their logits
                self.logits, self.ids = module.logits.detach(), out[0].detach()
                raise _Captured
            self.logits = gate_logits(out).detach()

        def experts_hook(module, args, kwargs):
            ids = chosen_ids(args, kwargs)
            if ids is None:
                raise ValueError(f"distill: the experts of {type(self.gate).__name__}'s block were not called with "
                                 "the chosen expert ids (hidden, ids, weights); grouter cannot read this family's choice")
            self.ids = ids.detach()
            raise _Captured

        self._handles.append(self.gate.register_forward_hook(gate_hook))
        if self.experts is not None:
            self._handles.append(self.experts.register_forward_pre_hook(experts_hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []

    def run(self, tokens: Tensor, attention_mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """(router logits [T, E], the experts the block chose [T, K]) for token ids [B, S]."""
        self.logits = self.ids = None
        try:
            if attention_mask is None:
                self.source(tokens)
            else:
                self.source(tokens, attention_mask=attention_mask)
        except _Captured:
            pass
        if self.logits is None or self.ids is None:
            raise RuntimeError(f"the source's MoE block at the distilled layer did not run for input {tuple(tokens.shape)}")
        E = self.logits.shape[-1]
        return self.logits.reshape(-1, E), self.ids.reshape(-1, self.ids.shape[-1]).long()


def check_choice(logits: Tensor, ids: Tensor, rule: RouterRule, where: str = "the source") -> float:
    """Fraction of tokens whose recomputed choice (`rule`) is the set the block chose; raises when
    the rule does not reproduce the block (a router kind grouter does not know)."""
    if ids.shape[0] == 0:
        return 1.0
    mine = choice_of(logits, rule, ids.shape[-1]).sort(-1).values
    same = (mine == ids.sort(-1).values.to(mine.device)).all(-1).float().mean().item()
    if same < 1 - _TIE_TOLERANCE:
        raise ValueError(f"distill: {where}'s router chose other experts than grouter's reading of it "
                         f"({rule.describe()}) on {1 - same:.1%} of tokens; this router kind is not supported")
    return same
