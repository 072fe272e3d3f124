"""What a source MoE router really chooses, and the teacher distribution distilled from it.

Routers of real MoE families choose their experts in different ways. Every kind grouter reads is
one rule with three parts (l: the router's logits, E per token):

    scores       s = softmax(l)            (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2, Ernie 4.5)
                 s = sigmoid(l)            (DeepSeek-V3, GLM-4-MoE, dots.llm1, grouter's SigmoidTopKRouter)
    correction   c = s + b                 (b: the router's correction bias, `e_score_correction_bias`;
                                            it changes which experts are chosen, not their weights)
    group limit  only experts of the `topk_group` best of `n_group` groups may be chosen (group score:
                 the sum of its two best c, DeepSeek-V3; its best c, DeepSeek-V2 group_limited_greedy)

and the choice is the top-k of c among the allowed experts. Top-k-then-softmax routers (GPT-OSS:
top-k of l, softmax over the k) choose exactly what softmax-then-top-k chooses, so they are the
plain softmax kind.

The teacher distribution is the corrected scores of the allowed experts, normalised:
P_e = c_e / sum_allowed c (0 outside the chosen groups). Its top-k is the source's choice, and
for the plain softmax kind it is softmax(l) itself, the paper's target. For a sigmoid router
without bias it is the normalised affinity DeepSeek-V3's own balance loss uses. Where a large
negative bias makes c_e <= 0, log P continues below c = FLOOR along its tangent, so the order of
every expert (and so the choice) is kept while such experts get no teacher mass to speak of.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["RouterRule", "rule_of", "teacher_scores", "choice_of"]

FLOOR = 1e-12  # below it log c goes on along its tangent: finite and in order for c <= 0


@dataclass
class RouterRule:
    """A source router's rule (see the module docstring)."""

    score: str = "softmax"  # "softmax" | "sigmoid"
    bias: Optional[Tensor] = None  # [E] correction bias added to the scores for choosing
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "top2_sum"  # "top2_sum" (DeepSeek-V3) | "max" (DeepSeek-V2)

    def describe(self) -> str:
        parts = [self.score]
        if self.bias is not None and bool(self.bias.ne(0).any()):
            parts.append("correction bias")
        if self.n_group > 1 and self.topk_group < self.n_group:
            parts.append(f"best {self.topk_group} of {self.n_group} groups ({self.group_score})")
        return " + ".join(parts)


def rule_of(gate: nn.Module) -> RouterRule:
    """The rule of a router module, read from its attributes (transformers' MoE gates and grouter's
    learned routers). Whether it is right is checked on the source's own choices (`check_choice`)."""
    from ..nn.learned_routers import SigmoidTopKRouter

    if isinstance(gate, SigmoidTopKRouter):
        return RouterRule("sigmoid", gate.expert_bias.detach())
    bias = getattr(gate, "e_score_correction_bias", None)
    score = "sigmoid" if isinstance(bias, Tensor) else "softmax"
    statics = getattr(gate, "moe_statics", None)  # Ernie 4.5: softmax probabilities + bias
    if bias is None and statics is not None:
        bias = getattr(statics, "e_score_correction_bias", None)
    n_group, topk_group = int(getattr(gate, "num_group", 1) or 1), int(getattr(gate, "topk_group", 1) or 1)
    method = getattr(gate, "topk_method", None)
    group_score = "top2_sum"
    if method is not None:  # DeepSeek-V2: groups only with group_limited_greedy, scored by their best expert
        group_score = "max"
        if method != "group_limited_greedy":
            n_group = topk_group = 1
    bias = bias.detach().reshape(-1).float() if isinstance(bias, Tensor) else None
    return RouterRule(score, bias, n_group, topk_group, group_score)


def _allowed(c: Tensor, rule: RouterRule) -> Optional[Tensor]:
    """[T, E] bool: experts in the chosen groups (None: no group limit)."""
    if rule.n_group <= 1 or rule.topk_group >= rule.n_group:
        return None
    T, E = c.shape
    if E % rule.n_group:
        raise ValueError(f"the source router has {E} experts in {rule.n_group} groups (not a whole number each)")
    grouped = c.view(T, rule.n_group, E // rule.n_group)
    if rule.group_score == "max":
        group = grouped.max(-1).values
    else:
        group = grouped.topk(min(2, E // rule.n_group), dim=-1).values.sum(-1)
    chosen = group.topk(rule.topk_group, dim=-1).indices
    mask = torch.zeros_like(group, dtype=torch.bool).scatter_(1, chosen, True)
    return mask[:, :, None].expand(T, rule.n_group, E // rule.n_group).reshape(T, E)


def _corrected(logits: Tensor, rule: RouterRule) -> Tensor:
    l = logits.float()
    s = l.softmax(-1) if rule.score == "softmax" else l.sigmoid()
    return s if rule.bias is None else s + rule.bias.to(s.device)


def teacher_scores(logits: Tensor, rule: RouterRule) -> Tensor:
    """z [T, E] (float32) with softmax(z) = P, the teacher distribution of router logits [T, E]:
    the logits themselves for a plain softmax router, else log c (-inf outside the chosen groups)."""
    c = _corrected(logits, rule)
    if rule.score == "softmax" and rule.bias is None and _allowed(c, rule) is None:
        return logits.float()  # exactly the paper's target, without rounding through c
    z = torch.where(c > FLOOR, c.clamp_min(FLOOR).log(), math.log(FLOOR) + (c - FLOOR) / FLOOR)
    allowed = _allowed(c, rule)
    if allowed is not None:
        z = z.masked_fill(~allowed, float("-inf"))
    return z


def choice_of(logits: Tensor, rule: RouterRule, top_k: int) -> Tensor:
    """The experts [T, K] the rule chooses (for checking the rule against the source's own choice)."""
    c = _corrected(logits, rule)
    allowed = _allowed(c, rule)
    if allowed is not None:
        c = c.masked_fill(~allowed, float("-inf"))
    return c.topk(top_k, dim=-1).indices
