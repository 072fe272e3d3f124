"""The compiled ops (``torch.ops.grouter.*``) and everything of their Python side: wrappers, fake
kernels, autograd, the composites other devices run, one activation registry.

``routing_plan`` sorts the T*K (token, k) slots of a top-k routing by expert once; ``permute``,
``unpermute`` and the autograd formulas then only follow its ``row_of`` indices; ``expert_mlp``
runs every expert's gated MLP over expert-major rows; ``coactivation`` counts expert pairs. The
kernels live in ``csrc/`` and validate their inputs, so a bad input raises ``ValueError`` /
``IndexError`` rather than touching memory it should not. Importing this package registers all
of it: the op layer works on its own (``grouter.nn`` and above only call it).
"""

from .activations import ACTIVATIONS, GLU_ACTIVATIONS
from .core import (MAX_COACTIVATION_EXPERTS, MAX_EXPERTS, RoutingPlan, coactivation, cpu_output_cache_bytes,
                   cpu_output_cache_limit, cuda_checks_enabled, empty_cpu_output_cache, glu, has_cuda_kernels,
                   no_double_backward, permute, routing_plan, set_cpu_output_cache_limit, set_cuda_checks, unpermute)
from .experts import expert_mlp

__all__ = [
    "RoutingPlan", "routing_plan", "permute", "unpermute", "coactivation", "glu", "GLU_ACTIVATIONS", "ACTIVATIONS",
    "expert_mlp", "set_cpu_output_cache_limit", "cpu_output_cache_limit", "cpu_output_cache_bytes",
    "empty_cpu_output_cache", "set_cuda_checks", "cuda_checks_enabled", "has_cuda_kernels",
]
