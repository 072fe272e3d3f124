import pytest
import torch

import grouter
from conftest import small_grouter, token_batches


def skewed(E=8, K=2):
    torch.manual_seed(1)
    g = small_grouter(E, K)
    with torch.no_grad():  # push experts 0 and 1 ahead for every token
        direction = g.norm(g.embed.weight).mean(0)
        g.proj.weight[:2] += 0.6 * direction / direction.norm()
        g.proj.weight[:2] *= 3
    return g


def params_except_proj(g):
    return {n: p.detach().clone() for n, p in g.named_parameters() if not n.startswith("proj.")}


@pytest.mark.parametrize("method", ["aux", "bias"])
def test_tune_halves_maxvio_and_touches_only_the_projection(method):
    g = skewed()
    batches = token_batches(8)
    frozen = params_except_proj(g)
    result = grouter.tune(g, batches, method=method, progress=False)
    assert result["max_vio_before"] > 1.0
    assert result["max_vio_after"] < result["max_vio_before"] / 2, result
    for n, p in params_except_proj(g).items():
        assert torch.equal(p, frozen[n]), n
    assert all(p.requires_grad for p in g.parameters())


def test_expand_then_tune_balances():
    g = skewed(E=6, K=2)
    batches = token_batches(8)
    grown = grouter.expand(g, 10, batches)
    assert grown.num_experts == 10 and grown.top_k == 2
    result = grouter.tune(grown, batches, progress=False)
    assert result["max_vio_after"] < 0.5, result
    with pytest.raises(ValueError):
        grouter.expand(g, 4, batches)


def test_expand_keeps_the_split_experts_mass():
    g = small_grouter(4, 1)
    batches = token_batches(2)
    grown = grouter.expand(g, 5, batches, noise=0.0)
    x = batches[0]
    p_old = g(x).softmax(-1)
    p_new = grown(x).softmax(-1)
    torch.testing.assert_close(p_new[..., :4].sum(-1) + p_new[..., 4], p_old.sum(-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["aux", "bias"])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_tune_is_never_worse_on_heldout_and_restores_requires_grad(method, score):
    g = small_grouter(8, 2, score=score)
    g.embed.weight.requires_grad_(False)  # a user's frozen embedding stays frozen
    train, held = token_batches(6), token_batches(3, seed=9)
    before = grouter.nn.max_vio(torch.cat([g.route(b)[0].reshape(-1, 2) for b in held]), 8)
    result = grouter.router.tune(g, train, method=method, steps=30, heldout=held, eval_every=5, progress=False)
    after = grouter.nn.max_vio(torch.cat([g.route(b)[0].reshape(-1, 2) for b in held]), 8)
    assert result["max_vio_before"] == pytest.approx(before)
    assert result["max_vio_after"] == pytest.approx(after) and after <= before
    assert result["evaluated_on"] == "heldout"
    assert not g.embed.weight.requires_grad and g.proj.weight.requires_grad


def test_tune_on_a_balanced_grouter_changes_nothing_it_cannot_improve():
    g = small_grouter(8, 2)
    batches = token_batches(4)
    state = {k: v.clone() for k, v in g.state_dict().items()}
    result = grouter.tune(g, batches, steps=5, lr=1e-9, progress=False)  # steps too small to help
    if result["best_step"] == 0:
        assert g.state_dict().keys() == state.keys()
        assert all(torch.equal(g.state_dict()[k], v) for k, v in state.items())


def test_expand_under_sigmoid_keeps_each_copy_at_the_original_logit():
    g = small_grouter(4, 1, score="sigmoid")
    batches = token_batches(2)
    grown = grouter.expand(g, 5, batches, noise=0.0)
    x = batches[0]
    old, new = g(x), grown(x)
    # the copy's logit comes from a 5-row matmul, the original's from a 4-row one: equal up to rounding
    split = [i for i in range(4) if torch.allclose(new[..., 4], new[..., i], rtol=1e-5, atol=1e-5)]
    assert len(split) == 1
    torch.testing.assert_close(new[..., :4], old, rtol=1e-5, atol=1e-5)  # nothing shifted
