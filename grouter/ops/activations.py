"""The gated activations the expert MLP knows: one registry for the Python side.

The names are those the C++ kernels parse (csrc/glu_checks.h `parse_activation`; tests check that
they accept exactly these); each has torch's own function and derivative, which the composite
(fp64, other devices) uses and the tests compare with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ACTIVATIONS", "ACTIVATION_BACKWARD", "GLU_ACTIVATIONS"]

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}

# d act / d x applied to an incoming gradient g: act'(x) * g.
ACTIVATION_BACKWARD = {
    "silu": lambda g, x: torch.ops.aten.silu_backward(g, x),
    "gelu": lambda g, x: torch.ops.aten.gelu_backward(g, x),
    "gelu_tanh": lambda g, x: torch.ops.aten.gelu_backward(g, x, approximate="tanh"),
    "relu": lambda g, x: torch.ops.aten.threshold_backward(g, x, 0),
}

GLU_ACTIVATIONS = tuple(ACTIVATIONS)
