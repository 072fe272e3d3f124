import pytest
import torch

import reference as ref
from grouter import ops


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("T,K,E", [(0, 2, 4), (1, 1, 1), (9, 3, 3), (1000, 2, 16), (3000, 8, 128),
                                   (500, 4, 256), (40, 64, 64), (200, 1, 1000)])
def test_matches_reference(T, K, E, id_dtype, device):
    ids = ref.random_routing(T, K, E, dtype=id_dtype, device=device)
    C = ops.coactivation(ids, E)
    assert C.dtype == torch.int64 and C.shape == (E, E)
    assert torch.equal(C, ref.coactivation(ids, E))
    assert torch.equal(C, C.T)
    assert torch.equal(C.diagonal(), torch.bincount(ids.reshape(-1).long(), minlength=E))


def test_large_e_counts_in_one_task(device):
    # E*E*8 bytes above the per-task budget: one private matrix only.
    ids = ref.random_routing(300, 3, 3000, device=device)
    assert torch.equal(ops.coactivation(ids, 3000), ref.coactivation(ids, 3000))


def test_non_contiguous_ids(device):
    ids = ref.random_routing(400, 4, 32, device=device).T.contiguous().T
    assert torch.equal(ops.coactivation(ids, 32), ref.coactivation(ids, 32))
