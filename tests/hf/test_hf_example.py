"""examples/train_hf_predispatch.py: a transformers MoE trained from pre-dispatched routes, saved, loaded."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("transformers")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_hf_predispatch.py"


def test_example_trains_saves_and_generates(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("train_hf_predispatch", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    before, after = module.main(["--out", str(tmp_path), "--steps", "30"])
    assert after < before - 1.0  # held-out windows, never trained on
    assert (tmp_path / "model" / "grouter" / "config.json").is_file()
    out = capsys.readouterr().out
    assert f"reloaded: held-out loss {after:.3f}" in out and "generated: b'def " in out
