import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import VOCAB, small_grouter
from grouter import Grouter
from grouter.cli import main


def test_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "grouter", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("distill", "fold", "tune", "predispatch", "inspect"):
        assert cmd in out.stdout


def test_fold_tune_predispatch_inspect(tmp_path, capsys):
    small_grouter().save(tmp_path / "g")
    np.save(tmp_path / "tokens.npy", np.random.randint(0, VOCAB, 4000))
    data = ["--data", str(tmp_path / "tokens.npy"), "--seq-len", "32"]
    main(["fold", "--grouter", str(tmp_path / "g"), *data, "--experts", "3", "--out", str(tmp_path / "f")])
    assert Grouter.load(tmp_path / "f").num_experts == 3
    main(["tune", "--grouter", str(tmp_path / "f"), *data, "--steps", "20", "--out", str(tmp_path / "t")])
    main(["predispatch", "--grouter", str(tmp_path / "t"), *data, "--out", str(tmp_path / "p")])
    main(["inspect", str(tmp_path / "t"), *data])
    main(["inspect", str(tmp_path / "p")])
    out = capsys.readouterr().out
    assert "MaxVio" in out and "max_vio" in out and "grouter-predispatch" in out


def test_distill_command(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.OlmoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=4, num_experts=8,
                                      num_experts_per_tok=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    transformers.OlmoeForCausalLM(config).save_pretrained(tmp_path / "src")
    np.save(tmp_path / "tokens.npy", np.random.randint(0, VOCAB, 2000))
    main(["distill", "--source", str(tmp_path / "src"), "--data", str(tmp_path / "tokens.npy"), "--seq-len", "32",
          "--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--steps", "5", "--out", str(tmp_path / "g")])
    g = Grouter.load(tmp_path / "g")
    assert g.num_experts == 8 and g.vocab_size == VOCAB and g.causal


def test_damaged_grouter_is_a_clean_exit(tmp_path):
    small_grouter().save(tmp_path / "g")
    (tmp_path / "g" / "model.safetensors").write_bytes(b"junk")
    np.save(tmp_path / "tokens.npy", np.random.randint(0, VOCAB, 400))
    with pytest.raises(SystemExit, match="Grouter.load"):
        main(["inspect", str(tmp_path / "g")])
    assert torch.is_tensor(torch.zeros(1))
