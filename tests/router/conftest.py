import warnings

import pytest
import torch

from grouter import Grouter

VOCAB = 64


def small_grouter(E=8, K=2, causal=True, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Grouter(VOCAB, E, K, d_model=32, n_layers=2, n_heads=2, causal=causal, **kw)


def token_batches(n=6, B=4, S=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (B, S), generator=g) for _ in range(n)]


@pytest.fixture
def grouter_model():
    torch.manual_seed(0)
    return small_grouter()


@pytest.fixture
def batches():
    return token_batches()
