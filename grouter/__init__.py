"""grouter: fixed, distilled routing for Mixture-of-Experts training (arXiv 2603.06626).

The compiled core (``grouter.ops``) plans and executes MoE dispatch: a routing plan built once per
step, permute into expert-major rows, and a weighted, deterministic combine back to tokens.
"""

import torch  # noqa: F401  (libtorch must be loaded before the extension)

from . import nn, ops
from .ops import RoutingPlan
from .nn import fold_groups
from .router import (Grouter, GrouterCache, PredispatchReader, TableRouter, TeacherLogits, affinity, distill, expand,
                     fold, heldout_metrics, predispatch, routing_consistency, teacher_logits, tune)

__version__ = "0.1.0"
__all__ = [
    "nn", "ops", "RoutingPlan", "Grouter", "GrouterCache", "distill", "affinity", "fold_groups", "fold", "expand", "tune",
    "predispatch", "PredispatchReader", "routing_consistency", "teacher_logits", "TeacherLogits", "heldout_metrics",
    "TableRouter",
    "__version__",
]
