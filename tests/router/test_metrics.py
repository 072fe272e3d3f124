import math

import torch

from conftest import token_batches
from grouter.nn import load_cv, max_vio
from grouter.router import routed_max_vio, routing_consistency, routing_entropy


def test_balance_metrics():
    balanced = torch.arange(16).remainder(4).view(8, 2)
    assert max_vio(balanced, 4) == 0.0 and load_cv(balanced, 4) == 0.0
    skewed = torch.tensor([[0, 1]] * 6 + [[2, 3]] * 2)
    assert max_vio(skewed, 4) == 0.5
    assert abs(load_cv(skewed, 4) - 0.5) < 1e-12


def test_entropy_bounds():
    assert abs(routing_entropy(torch.zeros(5, 8)) - math.log(8)) < 1e-6
    assert routing_entropy(torch.tensor([[100.0, 0, 0, 0]])) < 1e-6


def test_consistency(grouter_model):
    batches = token_batches(2)
    assert routing_consistency(grouter_model, grouter_model, batches) == 1.0
    other = type(grouter_model)(**grouter_model.config)
    assert routing_consistency(grouter_model, other, batches) < 1.0


def test_routed_max_vio_counts_all_batches_together(grouter_model):
    batches = token_batches(3)
    with torch.no_grad():
        ids = torch.cat([grouter_model.route(b)[0].reshape(-1, grouter_model.top_k) for b in batches])
    assert routed_max_vio(grouter_model, batches) == max_vio(ids, grouter_model.num_experts)
    assert routed_max_vio(grouter_model, []) == max_vio(torch.empty(0, grouter_model.top_k, dtype=torch.int64),
                                                       grouter_model.num_experts)
