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
