"""The Grouter: a standalone router distilled from a trained MoE, folded, tuned and pre-dispatched."""

from .fold import affinity, coactivation_counts, expand, fold
from .metrics import batch_max_vio, routed_max_vio, routing_consistency, routing_entropy
from .model import Grouter, GrouterCache
from .predispatch import PredispatchReader, predispatch
from .train import batch_balance_loss, distill, heldout_metrics, kl_to_source, sequence_balance_loss, tune
from .table import TableRouter, table_agreement
from .teacher import TeacherLogits, teacher_logits

__all__ = [
    "Grouter", "GrouterCache", "distill", "kl_to_source", "heldout_metrics", "TeacherLogits", "teacher_logits", "tune",
    "sequence_balance_loss", "batch_balance_loss", "affinity", "coactivation_counts",
    "fold", "expand", "predispatch", "PredispatchReader", "batch_max_vio", "routed_max_vio",
    "routing_consistency", "routing_entropy", "TableRouter", "table_agreement",
]
