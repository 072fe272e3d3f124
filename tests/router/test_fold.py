import pytest
import torch

import grouter
from conftest import VOCAB, small_grouter


def test_affinity_is_coactivation_over_tokens(grouter_model, batches):
    A = grouter.affinity(grouter_model, batches)
    ids = torch.cat([grouter_model.route(b)[0].reshape(-1, 2) for b in batches])
    C = grouter.ops.coactivation(ids, 8).double() / ids.shape[0]
    C.fill_diagonal_(0)
    torch.testing.assert_close(A, C.float())
    assert torch.equal(A, A.T) and torch.all(A.diagonal() == 0)


def planted(E, block, noise=0.01, seed=0):
    """Affinity with dense blocks of `block` experts under a shuffled labelling."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(E, generator=g)
    A = noise * torch.rand(E, E, generator=g)
    for start in range(0, E, block):
        members = perm[start:start + block]
        A[members[:, None], members[None, :]] += 1.0
    A = (A + A.T) / 2
    A.fill_diagonal_(0)
    return A, perm


@pytest.mark.parametrize("E,block", [(16, 4), (32, 8), (12, 3)])
def test_planted_blocks_are_recovered(E, block):
    A, perm = planted(E, block)
    groups = grouter.fold_groups(A, E // block)
    for start in range(0, E, block):
        assert len(set(groups[perm[start:start + block]].tolist())) == 1
    assert torch.equal(groups, grouter.fold_groups(A, E // block))  # deterministic


@pytest.mark.parametrize("strategy", ["affinity", "random", "balance"])
@pytest.mark.parametrize("E,n", [(16, 5), (10, 3), (7, 7), (9, 1), (128, 24)])
def test_uneven_folds_are_balanced(E, n, strategy):
    A, _ = planted(E, 1)
    groups = grouter.fold_groups(A, n, strategy=strategy)
    sizes = torch.bincount(groups, minlength=n)
    assert sizes.max() - sizes.min() <= 1 and sizes.sum() == E
    assert int((sizes == E // n + 1).sum()) == (E % n if E % n else 0)


def test_balance_strategy_spreads_load():
    load = torch.tensor([10.0, 9, 8, 7, 1, 1, 1, 1])
    groups = grouter.fold_groups(torch.zeros(8, 8), 4, strategy="balance", load=load)
    totals = torch.zeros(4).index_add_(0, groups, load)
    assert totals.max() - totals.min() <= 3


def test_fold_sums_source_logits(grouter_model, batches):
    groups = grouter.fold_groups(grouter.affinity(grouter_model, batches), 3)
    folded = grouter.fold(grouter_model, groups)
    assert folded.num_experts == 3 and folded.top_k == 2
    M = torch.zeros(8, 3)
    M[torch.arange(8), groups] = 1
    x = torch.randint(0, VOCAB, (2, 16))
    torch.testing.assert_close(folded(x), grouter_model(x) @ M, rtol=1e-5, atol=1e-5)
    assert grouter.fold(grouter_model, groups, top_k=1).top_k == 1
    with pytest.warns(UserWarning, match="fewer than top_k=2"):  # lowered to min(top_k, n), never silently
        assert grouter.fold(grouter_model, torch.zeros(8, dtype=torch.long)).top_k == 1


def test_fold_sums_biases():
    g = small_grouter(bias=True)
    with torch.no_grad():
        g.proj.bias.copy_(torch.arange(8.0))
    folded = grouter.fold(g, torch.tensor([0, 1, 0, 1, 2, 2, 2, 2]))
    torch.testing.assert_close(folded.proj.bias, torch.tensor([2.0, 4.0, 22.0]))


def test_bad_groups():
    g = small_grouter()
    with pytest.raises(ValueError):
        grouter.fold(g, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError):
        grouter.fold(g, torch.tensor([0, 0, 0, 0, 2, 2, 2, 2]))  # target 1 unused
    with pytest.raises(ValueError):
        grouter.fold_groups(torch.zeros(4, 4), 5)
    with pytest.raises(ValueError):
        grouter.fold_groups(torch.zeros(4, 4), 2, strategy="magic")
