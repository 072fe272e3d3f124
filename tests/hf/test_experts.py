"""The "grouter" experts implementation in transformers: equal to eager, registered once, loaded by name."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import grouter  # noqa: E402
import grouter.hf  # noqa: E402  (registers "grouter")
from hf_models import MODELS, VOCAB, grads, tiny  # noqa: E402


@pytest.mark.parametrize("name", list(MODELS))
def test_grouter_experts_match_eager(name):
    torch.manual_seed(0)
    eager = tiny(name)
    ours = copy.deepcopy(eager)
    ours.set_experts_implementation("grouter")
    assert ours.config._experts_implementation == "grouter"
    ids = torch.randint(3, VOCAB, (3, 19))
    a, b = eager(ids).logits, ours(ids).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    a.square().sum().backward()
    b.square().sum().backward()
    ga, gb = grads(eager), grads(ours)
    assert ga.keys() == gb.keys() and any("experts" in n for n in ga)
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-4, atol=1e-5, msg=n)


def test_register_is_idempotent():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    grouter.hf.register()
    grouter.hf.register()
    assert ALL_EXPERTS_FUNCTIONS["grouter"] is grouter.hf.experts_forward


def test_from_pretrained_with_grouter_experts(tmp_path):
    model = tiny("olmoe")
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="grouter")
    assert loaded.config._experts_implementation == "grouter"
    ids = torch.randint(3, VOCAB, (2, 11))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
