import warnings

import pytest
import torch

from conftest import VOCAB, small_grouter
from grouter import Grouter


def test_shapes_and_routes(grouter_model):
    x = torch.randint(0, VOCAB, (3, 10))
    logits = grouter_model(x)
    assert logits.shape == (3, 10, 8)
    ids, w = grouter_model.route(x)
    assert ids.shape == w.shape == (3, 10, 2) and ids.dtype == torch.int64
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 10))
    assert torch.equal(ids, logits.topk(2, dim=-1).indices)
    torch.testing.assert_close(w, logits.topk(2, dim=-1).values.softmax(-1))
    assert grouter_model.route(x[0])[0].shape == (10, 2)


def test_causal_prefix_routes_do_not_move(grouter_model):
    x = torch.randint(0, VOCAB, (2, 30))
    y = x.clone()
    y[:, 17:] = torch.randint(0, VOCAB, (2, 13))
    assert torch.equal(grouter_model(x)[:, :17], grouter_model(y)[:, :17])
    assert torch.equal(grouter_model.route(x)[0][:, :17], grouter_model.route(y)[0][:, :17])


def test_bidirectional_warns_and_sees_the_future():
    with pytest.warns(UserWarning, match="future"):
        g = Grouter(VOCAB, 8, 2, d_model=32, n_layers=2, n_heads=2, causal=False)
    x = torch.randint(0, VOCAB, (2, 30))
    y = x.clone()
    y[:, 17:] = (y[:, 17:] + 1) % VOCAB
    assert not torch.allclose(g(x)[:, :17], g(y)[:, :17])


def test_sigmoid_scores_and_scaling():
    g = small_grouter(score="sigmoid", scaling=2.5)
    x = torch.randint(0, VOCAB, (2, 7))
    ids, w = g.route(x)
    torch.testing.assert_close(w.sum(-1), torch.full((2, 7), 2.5))


def test_bad_arguments():
    with pytest.raises(ValueError, match="top_k"):
        Grouter(VOCAB, 4, 5, d_model=32, n_layers=1, n_heads=2)
    with pytest.raises(ValueError, match="score"):
        Grouter(VOCAB, 4, 2, d_model=32, n_layers=1, n_heads=2, score="relu")
    with pytest.raises(ValueError, match="integer"):
        small_grouter()(torch.randn(2, 3))


def test_config_attributes(grouter_model):
    assert grouter_model.num_experts == 8 and grouter_model.top_k == 2 and grouter_model.causal
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert not small_grouter(causal=False).causal
