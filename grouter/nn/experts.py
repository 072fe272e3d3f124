"""Experts stored as transformers v5 stores them, computed by `grouter.ops.expert_mlp`.

`gate_up_proj [E, 2I, H]` and `down_proj [E, H, I]`, so weights move between a grouter MoE and a
transformers model without reshaping.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch
from torch import Tensor, nn

from ..ops import ACTIVATIONS, expert_mlp

__all__ = ["Experts"]


class Experts(nn.Module):
    """E gated MLP experts (SwiGLU by default), stored as transformers v5 stores them."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, activation: str = "silu",
                 device=None, dtype=None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        factory = dict(device=device, dtype=dtype)
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.activation = activation
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size, **factory))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default range, per expert.
        nn.init.uniform_(self.gate_up_proj, -1 / math.sqrt(self.hidden_size), 1 / math.sqrt(self.hidden_size))
        nn.init.uniform_(self.down_proj, -1 / math.sqrt(self.intermediate_size), 1 / math.sqrt(self.intermediate_size))

    def forward(self, rows: Tensor, expert_offsets: Union[Tensor, Sequence[int]]) -> Tensor:
        return expert_mlp(rows, expert_offsets, self.gate_up_proj, self.down_proj, self.activation)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
                f"intermediate_size={self.intermediate_size}, activation={self.activation!r}")
