import pytest
import torch

import reference as ref
from grouter import ops

SHAPES = [  # (T, K, E): empty, K=1, K=E, E=1, large E, uneven
    (0, 2, 4), (0, 1, 1), (1, 1, 1), (7, 1, 1), (5, 3, 3), (33, 8, 8), (1000, 2, 16),
    (3000, 8, 128), (257, 1, 1000), (64, 4, 256), (20000, 2, 16),
]


def check_plan(plan, expert_ids, E):
    sorted_tokens, row_of, offsets = ref.routing_plan(expert_ids, E)
    assert plan.sorted_tokens.dtype == torch.int32 and plan.row_of.dtype == torch.int32
    assert plan.expert_offsets.dtype == torch.int64
    assert torch.equal(plan.sorted_tokens, sorted_tokens)
    assert torch.equal(plan.row_of, row_of)
    assert torch.equal(plan.expert_offsets, offsets)


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("T,K,E", SHAPES)
def test_matches_reference(T, K, E, id_dtype, device):
    ids = ref.random_routing(T, K, E, dtype=id_dtype, device=device)
    plan = ops.routing_plan(ids, E)
    check_plan(plan, ids, E)
    assert plan.num_experts == E and plan.top_k == K
    assert torch.equal(plan.tokens_per_expert(), torch.bincount(ids.reshape(-1).long(), minlength=E))


def test_rows_are_expert_major_and_ascending(device):
    T, K, E = 500, 4, 32
    ids = ref.random_routing(T, K, E, device=device)
    plan = ops.routing_plan(ids, E)
    slot = torch.empty(T * K, dtype=torch.long, device=device)  # slot index t*K+k of every row
    slot[plan.row_of.reshape(-1).long()] = torch.arange(T * K, device=device)
    experts = ids.reshape(-1)[slot]
    assert torch.all(experts[1:] >= experts[:-1])
    same = experts[1:] == experts[:-1]
    assert torch.all(slot[1:][same] > slot[:-1][same])
    assert torch.equal(plan.sorted_tokens.long(), slot // K)


def test_non_contiguous_ids(device):
    T, K, E = 300, 3, 12
    ids_kt = ref.random_routing(T, K, E, device=device).T.contiguous()
    ids = ids_kt.T  # [T, K] view with strides (1, T)
    assert not ids.is_contiguous()
    check_plan(ops.routing_plan(ids, E), ids.contiguous(), E)


def test_unused_experts_have_empty_ranges(device):
    ids = torch.tensor([[5, 1], [1, 5]], device=device)
    plan = ops.routing_plan(ids, 8)
    assert plan.expert_offsets.tolist() == [0, 0, 2, 2, 2, 2, 4, 4, 4]
