import json
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
    assert main(["fold", "--grouter", str(tmp_path / "g"), *data, "--experts", "3", "--out", str(tmp_path / "f")]) == 0
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


def test_damaged_grouter_is_a_clean_exit(tmp_path, capsys):
    small_grouter().save(tmp_path / "g")
    (tmp_path / "g" / "model.safetensors").write_bytes(b"junk")
    assert main(["inspect", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("grouter inspect: Grouter.load") and "\n" not in err


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "grouter", *args], capture_output=True, text=True)


def test_help_shows_every_default_and_version():
    out = " ".join(run_cli("distill", "--help").stdout.split())
    for text in ("--device", "--source-dtype", "--heldout", "(default: 0.1)", "(default: 300)", "source's hidden size"):
        assert text in out, text
    assert run_cli("--version").stdout.startswith("grouter ")


@pytest.mark.parametrize("args,message", [
    (["tune", "--grouter", "G", "--data", "F", "--out", "o", "--steps", "x"], "argument --steps: invalid int value"),
    (["tune", "--grouter", "G", "--data", "GOOD", "--out", "o"], "grouter tune: Grouter.load: "),
    (["tune", "--grouter", "G", "--data", "FLOAT", "--out", "o"], "token ids must be integers, got float64"),
    (["fold", "--grouter", "G", "--data", "OOV", "--out", "o", "--experts", "2"], f"outside the vocabulary of {VOCAB}"),
    (["distill", "--source", "NOPE", "--data", "F", "--out", "o"], "--source NOPE: no such folder"),
])
def test_errors_are_one_line_and_exit_2(tmp_path, args, message):
    small_grouter().save(tmp_path / "g")
    np.save(tmp_path / "f.npy", np.random.rand(500))
    np.save(tmp_path / "oov.npy", np.full(500, VOCAB + 1))
    np.save(tmp_path / "good.npy", np.random.randint(0, VOCAB, 500))
    paths = {"GOOD": tmp_path / "good.npy", "G": tmp_path / "g", "FLOAT": tmp_path / "f.npy", "OOV": tmp_path / "oov.npy", "F": tmp_path / "none.npy",
             "NOPE": tmp_path / "nope"}
    if "GOOD" in args:
        paths["G"] = tmp_path / "missing"
    r = run_cli(*[str(paths.get(a, a)) for a in args])
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message.replace("NOPE", str(tmp_path / "nope")) in lines[0], r.stderr


def test_each_step_reports_heldout_figures(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=16, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, num_experts=8,
                                         num_experts_per_tok=2, moe_intermediate_size=16)
    model = transformers.Qwen3MoeForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(std=0.5)
    model.save_pretrained(tmp_path / "src", max_shard_size="50KB")
    np.random.randint(0, VOCAB, 8000).astype("uint16").tofile(tmp_path / "tokens.bin")
    data = ["--data", str(tmp_path / "tokens.bin"), "--dtype", "uint16", "--seq-len", "32"]
    assert main(["distill", "--source", str(tmp_path / "src"), *data, "--steps", "60", "--out", str(tmp_path / "g")]) == 0
    report = json.loads((tmp_path / "g" / "report.json").read_text())["heldout"]
    assert report["samples"] == 25 and report["kl_after"] < report["kl_before"]
    assert 0 <= report["topk_agreement_before"] < report["topk_agreement"] <= 1
    assert (tmp_path / "g" / "teacher" / "heldout" / "targets.bin").is_file()
    assert main(["fold", "--grouter", str(tmp_path / "g"), *data, "--experts", "4", "--out", str(tmp_path / "f")]) == 0
    assert "max_vio" in json.loads((tmp_path / "f" / "report.json").read_text())["heldout"]
    assert main(["tune", "--grouter", str(tmp_path / "f"), *data, "--out", str(tmp_path / "t")]) == 0
    tuned = json.loads((tmp_path / "t" / "report.json").read_text())
    # the state is kept by MaxVio on dev samples from the training side, never on the held-out ones
    sel = tuned["selection"]
    assert sel["split"] == "dev" and sel["max_vio_after"] <= sel["max_vio_before"]
    assert {"max_vio_before", "max_vio_after"} <= set(tuned["heldout"]) and tuned["heldout"]["samples"] == 25
