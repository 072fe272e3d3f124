import json

import pytest
import torch

from conftest import VOCAB, small_grouter
from grouter import Grouter


def test_roundtrip_is_exact(tmp_path, grouter_model):
    grouter_model.save(tmp_path / "g")
    loaded = Grouter.load(tmp_path / "g")
    assert loaded.config == grouter_model.config
    for (n1, a), (n2, b) in zip(grouter_model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(a, b)
    x = torch.randint(0, VOCAB, (2, 12))
    assert torch.equal(loaded(x), grouter_model(x))
    assert loaded.checksum() == grouter_model.checksum()
    config = json.loads((tmp_path / "g" / "config.json").read_text())
    assert config["format_version"] == 1 and config["config"]["causal"] is True


def test_bidirectional_roundtrip(tmp_path):
    g = small_grouter(causal=False, bias=True)
    g.save(tmp_path)
    assert Grouter.load(tmp_path).causal is False


@pytest.mark.parametrize("damage", ["missing_weights", "missing_config", "truncated", "flipped_byte",
                                    "bad_json", "other_config", "flipped_causal", "future_version"])
def test_damaged_artifacts_are_refused(tmp_path, grouter_model, damage):
    grouter_model.save(tmp_path)
    weights, config = tmp_path / "model.safetensors", tmp_path / "config.json"
    data = weights.read_bytes()
    if damage == "missing_weights":
        weights.unlink()
    elif damage == "missing_config":
        config.unlink()
    elif damage == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "flipped_byte":
        weights.write_bytes(data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:])
    elif damage == "bad_json":
        config.write_text("{not json")
    elif damage == "other_config":
        meta = json.loads(config.read_text())
        meta["config"]["num_experts"] = 9
        config.write_text(json.dumps(meta))
    elif damage == "flipped_causal":  # the weights still fit: only the recorded arguments can tell
        meta = json.loads(config.read_text())
        meta["config"]["causal"] = False
        config.write_text(json.dumps(meta))
    elif damage == "future_version":
        meta = json.loads(config.read_text())
        meta["format_version"] = 99
        config.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="Grouter.load"):
        Grouter.load(tmp_path)
