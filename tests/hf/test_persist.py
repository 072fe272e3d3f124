"""Saving and loading an attached model: the Grouter stays with it, and plain transformers never routes it silently."""

import json
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import grouter  # noqa: E402
import grouter.hf  # noqa: E402  (registers "grouter")
from hf_models import VOCAB, pair, small_grouter, tiny  # noqa: E402


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_save_and_load_keep_the_grouter(tmp_path, name):
    model, _, g = pair(name)
    model.eval()
    ids = torch.randint(3, VOCAB, (2, 10))
    expected = model(ids).logits
    grouter.hf.save_pretrained(model, tmp_path / "a")
    model.save_pretrained(tmp_path / "b")  # the attached model's own save keeps the Grouter too
    for folder in ("a", "b"):
        marker = json.loads((tmp_path / folder / "config.json").read_text())["grouter"]
        assert marker["path"] == "grouter" and marker["checksum"] == g.checksum()
        loaded = grouter.hf.from_pretrained(tmp_path / folder)
        assert loaded.config._experts_implementation == "grouter"
        assert grouter.hf.attachment_of(loaded).grouter.checksum() == g.checksum()
        assert torch.equal(loaded(ids).logits, expected)
    with pytest.raises(RuntimeError, match="saved with a Grouter"):  # loaded without grouter: not silent
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a", experts_implementation="grouter")(ids)
    # plain transformers, as a user or pipeline() loads it: the folder names the grouter implementation
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert plain.config._experts_implementation == "grouter"
    with pytest.raises(RuntimeError, match="grouter.hf.from_pretrained"):
        plain(ids)
    for implementation in ("eager", "grouped_mm"):  # chosen explicitly: it runs, but never silently
        other = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a", experts_implementation=implementation)
        with pytest.warns(UserWarning, match="its never-trained gates route it"):
            other(ids)
    code = f"import transformers; transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / 'a')!r})"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)  # grouter never imported
    assert r.returncode != 0 and 'experts_implementation="grouter"' in r.stderr


def test_load_errors(tmp_path):
    model, outside, g = pair()
    tiny("olmoe").save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="records no Grouter"):
        grouter.hf.from_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="not a folder"):
        grouter.hf.from_pretrained(tmp_path / "missing")
    grouter.hf.save_pretrained(model, tmp_path / "m")
    small_grouter().save(tmp_path / "m" / "grouter")  # another Grouter in its place
    with pytest.raises(ValueError, match="checksum"):
        grouter.hf.from_pretrained(tmp_path / "m")
    grouter.hf.save_pretrained(outside, tmp_path / "routes_only")
    loaded = grouter.hf.from_pretrained(tmp_path / "routes_only")
    assert grouter.hf.attachment_of(loaded).grouter is None
