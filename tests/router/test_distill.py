import pytest
import torch

import grouter
import grouter.hf
from conftest import VOCAB, small_grouter, token_batches
from grouter import nn as gnn

transformers = pytest.importorskip("transformers")


def tiny_olmoe():
    torch.manual_seed(0)
    config = transformers.OlmoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, num_experts=8,
                                      num_experts_per_tok=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = transformers.OlmoeForCausalLM(config)
    with torch.no_grad():
        for _, block, attr in grouter.nn.moe_blocks(model):
            getattr(block, attr).weight.normal_(std=0.3)
    return model


def test_distill_from_transformers_halves_the_kl():
    source = tiny_olmoe()
    g = small_grouter()
    batches = token_batches(8)
    before = grouter.router.kl_to_source(g, source, batches)
    history = grouter.distill(g, source, batches, progress=False)
    after = grouter.router.kl_to_source(g, source, batches)
    assert len(history) == 300 and history[-1] < history[0]
    assert after < before / 2, (before, after)


def test_distill_layer_choice_and_errors():
    source = tiny_olmoe()
    g = small_grouter()
    grouter.distill(g, source, token_batches(2), layer=1, steps=3, progress=False)
    with pytest.raises(ValueError, match="layer"):
        grouter.distill(g, source, token_batches(2), layer=5, steps=1, progress=False)
    with pytest.raises(ValueError, match="experts"):
        grouter.distill(small_grouter(E=6), source, token_batches(2), steps=1, progress=False)
    with pytest.raises(ValueError, match="MoE"):
        grouter.distill(g, torch.nn.Embedding(VOCAB, 8), token_batches(2), steps=1, progress=False)


class TinyMoELM(torch.nn.Module):
    """A grouter.nn source model: embedding -> learned-router MoE layers -> head."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 16)
        self.layers = torch.nn.ModuleList(gnn.MoE(16, 8, 8, 2, router="softmax") for _ in range(2))

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = x + layer(x)
        return x


def test_distill_from_a_grouter_nn_model():
    torch.manual_seed(0)
    source = TinyMoELM()
    with torch.no_grad():
        source.layers[0].router.weight.normal_(std=1.0)
    g = small_grouter()
    batches = token_batches(6)
    before = grouter.router.kl_to_source(g, source, batches)
    grouter.distill(g, source, batches, steps=100, progress=False)
    assert grouter.router.kl_to_source(g, source, batches) < before / 2
