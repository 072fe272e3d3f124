"""The README's round trip (train, save, load, generate with a Grouter), run exactly as written."""

import re
from pathlib import Path

import pytest

pytest.importorskip("transformers")

README = Path(__file__).resolve().parents[2] / "README.md"


def test_train_save_load_generate_snippet(tmp_path, monkeypatch):
    text = README.read_text()
    section = text[text.index("### Train, save, load and generate with a Grouter"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    assert (tmp_path / "my_model" / "grouter" / "model.safetensors").is_file()
