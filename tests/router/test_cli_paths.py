"""`grouter distill` and friends on the paths real users take: sharded checkpoints of sigmoid
families, padded datasets, reruns after the source changed, tampered folders, and every error a
line of its own (exit 2) before anything slow is loaded."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import small_grouter
from grouter import Grouter, PredispatchReader
from grouter.cli import main
from grouter.router.array_folder import write_header
from grouter.tokens import load_documents, split_samples
from sources import VOCAB, chosen_by_the_gate, family_model

datasets = pytest.importorskip("datasets")
from safetensors.torch import load_file, save_file  # noqa: E402

SMALL = ["--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--seq-len", "24", "--batch-size", "16"]


def save_source(path, family="deepseek_v3", **kw):
    model = family_model(family, **kw)
    model.save_pretrained(path, max_shard_size="60KB")
    return model


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepseek")
    model = save_source(root / "src", bias_std=1.0, n_group=4, topk_group=2)
    np.save(root / "tokens.npy", np.random.default_rng(0).integers(0, VOCAB, (60, 48)))  # 60 documents (rows)
    return root, model


def distill_args(root, out, *extra):
    return ["distill", "--source", str(root / "src"), "--data", str(root / "tokens.npy"), *SMALL, "--steps", "120",
            "--lr", "4e-3", "--out", str(out), *extra]


def test_sharded_deepseek_v3_reports_agreement_with_its_real_choice(deepseek, tmp_path):
    root, model = deepseek
    assert len(list((root / "src").glob("*.safetensors"))) > 2
    assert main(distill_args(root, tmp_path / "g")) == 0
    report = json.loads((tmp_path / "g" / "report.json").read_text())
    assert report["source"]["rule"] == "sigmoid + correction bias + best 2 of 4 groups (top2_sum)"
    held = split_samples(load_documents(root / "tokens.npy"), 24, 0.1, seed=0)[1]  # documents chosen by --seed
    assert report["heldout"]["unit"] == "documents" and report["heldout"]["samples"] == held.shape[0]
    g = Grouter.load(tmp_path / "g")
    theirs = chosen_by_the_gate(model, held)
    with torch.no_grad():
        mine = g(held).reshape(-1, 8).topk(2, -1).indices
    independent = float((mine[:, :, None] == theirs[:, None, :]).any(-1).float().mean())
    assert report["heldout"]["topk_agreement"] == pytest.approx(independent, abs=1e-6)
    assert report["heldout"]["topk_agreement"] > 0.8


def test_equal_runs_are_identical_and_the_seed_matters(deepseek, tmp_path):
    root, _ = deepseek
    for name in ("a", "b"):
        assert main(distill_args(root, tmp_path / name, "--steps", "20")) == 0
    assert main(distill_args(root, tmp_path / "c", "--steps", "20", "--seed", "1")) == 0
    for f in ("model.safetensors", "report.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
        assert (tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes(), f
    data = ["--data", str(root / "tokens.npy"), "--seq-len", "24"]
    for name in ("a", "b"):
        assert main(["fold", "--grouter", str(tmp_path / "a"), *data, "--experts", "4", "--out",
                     str(tmp_path / f"fold_{name}")]) == 0
        assert main(["tune", "--grouter", str(tmp_path / f"fold_{name}"), *data, "--steps", "20", "--out",
                     str(tmp_path / f"tune_{name}")]) == 0
    for f in ("fold_a", "tune_a"):
        other = f.replace("_a", "_b")
        for name in ("model.safetensors", "report.json"):
            assert (tmp_path / f / name).read_bytes() == (tmp_path / other / name).read_bytes()


def test_a_changed_source_is_refused_on_rerun(tmp_path):
    save_source(tmp_path / "src", bias_std=0.1)
    np.save(tmp_path / "tokens.npy", np.random.default_rng(0).integers(0, VOCAB, 3000))
    args = ["distill", "--source", str(tmp_path / "src"), "--data", str(tmp_path / "tokens.npy"), *SMALL, "--steps",
            "5", "--out", str(tmp_path / "g")]
    assert main(args) == 0
    assert main(args) == 0  # the same source and data: the teacher targets are reused
    save_source(tmp_path / "src", bias_std=0.1, seed=1)  # overwritten in place: same files, other weights
    r = run_cli(*args[1:], command="distill")
    assert r.returncode == 2 and "--overwrite" in error_line(r, "distill") and "another source" in r.stderr
    assert main(args + ["--overwrite"]) == 0


def test_a_router_weight_missing_from_the_checkpoint_is_named(tmp_path):
    save_source(tmp_path / "src", family="qwen3_moe")
    index_file = tmp_path / "src" / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    key = "model.layers.0.mlp.gate.weight"
    shard = tmp_path / "src" / index["weight_map"].pop(key)
    tensors = load_file(shard)
    tensors.pop(key)
    save_file(tensors, shard, metadata={"format": "pt"})
    index_file.write_text(json.dumps(index))
    np.save(tmp_path / "tokens.npy", np.random.default_rng(0).integers(0, VOCAB, 3000))
    r = run_cli("--source", str(tmp_path / "src"), "--data", str(tmp_path / "tokens.npy"), "--out",
                str(tmp_path / "g"), command="distill")
    assert r.returncode == 2 and "checkpoint has no layers.0.mlp.gate.weight" in error_line(r, "distill")


def test_padded_datasets_keep_pads_out_of_everything(tmp_path):
    save_source(tmp_path / "src", family="qwen3_moe")
    rng = np.random.default_rng(0)
    rows, masks = [], []
    for _ in range(80):  # 256-token rows, 60% padding on the right
        real = int(rng.integers(60, 140))
        rows.append(list(rng.integers(3, VOCAB, real)) + [0] * (256 - real))
        masks.append([1] * real + [0] * (256 - real))
    datasets.Dataset.from_dict({"input_ids": rows, "attention_mask": masks}).save_to_disk(tmp_path / "ds")
    out = tmp_path / "g"
    assert main(["distill", "--source", str(tmp_path / "src"), "--data", str(tmp_path / "ds"), "--seq-len", "128",
                 "--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--steps", "60", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())["heldout"]
    real = sum(sum(m) for m in masks)
    assert report["unit"] == "documents" and report["tokens"] > 0
    assert report["topk_agreement"] > report["topk_agreement_before"]
    for part in ("train", "heldout"):  # no pad id (0) ever reached the teacher
        tokens = np.fromfile(out / "teacher" / part / "tokens.bin", dtype="<i4")
        assert (tokens > 0).all()
    assert report["tokens"] + json.loads((out / "report.json").read_text())["train_samples"] * 128 <= real


def test_tampered_predispatch_folders_are_refused(tmp_path):
    g = small_grouter()
    g.save(tmp_path / "g")
    np.save(tmp_path / "tokens.npy", np.random.default_rng(0).integers(0, 64, 4000))
    assert main(["predispatch", "--grouter", str(tmp_path / "g"), "--data", str(tmp_path / "tokens.npy"),
                 "--seq-len", "32", "--out", str(tmp_path / "p")]) == 0
    assert json.loads((tmp_path / "p" / "report.json").read_text())["command"] == "predispatch"
    assert main(["inspect", str(tmp_path / "p")]) == 0
    data = bytearray((tmp_path / "p" / "tokens.bin").read_bytes())
    data[32 * 4 * 7 + 5] ^= 0x10  # one bit of sample 7
    (tmp_path / "p" / "tokens.bin").write_bytes(bytes(data))
    reader = PredispatchReader(tmp_path / "p", grouter=g)
    reader[6]
    with pytest.raises(ValueError, match="sample 7 does not match its digest"):
        reader[7]
    r = run_cli(str(tmp_path / "p"), command="inspect")
    assert r.returncode == 2 and "sample 7 does not match its digest" in error_line(r, "inspect")
    header = json.loads((tmp_path / "p" / "header.json").read_text())
    for change, message in (({"ids_dtype": "bogus"}, "invalid ids_dtype 'bogus'"),
                            ({"count": header["seq_len"], "seq_len": header["count"]}, "bytes, the header says|digest")):
        edited = {k: v for k, v in header.items() if k != "header_sha256"}
        edited.update(change)
        (tmp_path / "p" / "header.json").write_text(json.dumps(edited))
        with pytest.raises(ValueError, match="does not match its checksum"):
            PredispatchReader(tmp_path / "p")
        write_header(tmp_path / "p", edited)  # even re-signed, the fields are checked
        with pytest.raises(ValueError, match=message):
            PredispatchReader(tmp_path / "p").verify()


def run_cli(*args, command):
    return subprocess.run([sys.executable, "-m", "grouter", command, *map(str, args)], capture_output=True, text=True)


def error_line(r, command):
    """The one error line (stderr's last; progress and status lines may come before it, no traceback)."""
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr and [x for x in lines if x.startswith("grouter ")] == lines[-1:], r.stderr
    assert lines[-1].startswith(f"grouter {command}: ")
    return lines[-1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    small_grouter(E=16).save(root / "g")
    np.save(root / "tokens.npy", np.random.default_rng(0).integers(0, 64, 3000))
    save_source(root / "src", family="qwen3_moe")
    (root / "text.txt").write_text("the routing of tokens")
    (root / "saved_model" / "grouter").mkdir(parents=True)
    small_grouter().save(root / "saved_model" / "grouter")
    (root / "saved_model" / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    (root / "garbled").mkdir()
    for f in (root / "src").iterdir():
        (root / "garbled" / f.name).write_bytes(f.read_bytes())
    shard = sorted((root / "garbled").glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    return root


DISTILL = ["--source", "SRC", "--data", "DATA", "--out", "OUT"]
TUNE = ["--grouter", "G", "--data", "DATA", "--out", "OUT"]
CASES = {
    "max-samples 0": ("distill", DISTILL + ["--max-samples", "0"], "--max-samples: must be a positive integer, got 0"),
    "n-layers 0": ("distill", DISTILL + ["--n-layers", "0"], "--n-layers: must be a positive integer, got 0"),
    "top-k 0": ("distill", DISTILL + ["--top-k", "0"], "--top-k: must be a positive integer, got 0"),
    "d-model 0": ("distill", DISTILL + ["--d-model", "0"], "--d-model: must be a positive integer, got 0"),
    "n-heads 0": ("distill", DISTILL + ["--n-heads", "0"], "--n-heads: must be a positive integer, got 0"),
    "steps 0": ("distill", DISTILL + ["--steps", "0"], "--steps: must be a positive integer, got 0"),
    "tune lr 0": ("tune", TUNE + ["--lr", "0"], "--lr: must be a positive number, got 0"),
    "heldout 1": ("tune", TUNE + ["--heldout", "1"], "--heldout: must be a fraction in (0, 1), got 1"),
    "cuda on a CPU torch": ("distill", DISTILL + ["--device", "cuda"], "--device cuda: no CUDA device is available"),
    "a garbled shard": ("distill", ["--source", "GARBLED", "--data", "DATA", "--out", "OUT"],
                        "cannot read the checkpoint"),
    "bad data before a garbled source": ("distill", ["--source", "GARBLED", "--data", "MISSING", "--out", "OUT"],
                                         "--data MISSING: no such file"),
    "tokenizer typo": ("distill", DISTILL[:2] + ["--data", "TEXT", "--tokenizer", "./tokenizr", "--out", "OUT"],
                       "--tokenizer ./tokenizr: no such folder"),
    "source without a tokenizer": ("distill", DISTILL[:2] + ["--data", "TEXT", "--out", "OUT"],
                                   "has no tokenizer; pass --tokenizer FOLDER"),
    "a saved model folder as --grouter": ("tune", ["--grouter", "SAVED", "--data", "DATA", "--out", "OUT"],
                                          "pass --grouter SAVED/grouter"),
    "fold to more experts": ("fold", TUNE + ["--experts", "32"], "`grouter expand` makes more"),
    "fold below top_k": ("fold", TUNE + ["--experts", "1"], "fewer than the Grouter's top_k 2; pass --top-k"),
    "expand to fewer": ("expand", TUNE + ["--experts", "4"], "`grouter fold` makes fewer"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_errors_are_one_line_before_anything_slow(files, tmp_path, case):
    command, args, message = CASES[case]
    paths = {"SRC": files / "src", "DATA": files / "tokens.npy", "OUT": tmp_path / "out", "G": files / "g",
             "TEXT": files / "text.txt", "SAVED": files / "saved_model", "GARBLED": files / "garbled",
             "MISSING": files / "missing.npy"}
    r = run_cli(*[paths.get(a, a) for a in args], command=command)
    expected = message
    for name in ("MISSING", "SAVED"):
        expected = expected.replace(name, str(paths[name]))
    assert r.returncode == 2 and expected in error_line(r, command), r.stderr
    if command == "distill":
        assert not (tmp_path / "out" / "teacher").exists()


def test_any_escaping_exception_is_one_line_and_traceback_on_request(files, monkeypatch, capsys, tmp_path):
    import grouter.cli as cli

    def boom(args):
        raise KeyError("inner")

    monkeypatch.setattr(cli, "cmd_tune", boom)
    args = ["tune", "--grouter", str(files / "g"), "--data", str(files / "tokens.npy"), "--out", str(tmp_path / "o")]
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == "grouter tune: KeyError: 'inner'"
    monkeypatch.setenv("GROUTER_TRACEBACK", "1")
    with pytest.raises(KeyError):
        main(args)


def test_out_of_vocabulary_ids_are_named():
    g = small_grouter()
    with pytest.raises(ValueError, match=r"token id 64 is outside its vocabulary \[0, 64\)"):
        g.route(torch.tensor([[1, 64]]))


def test_help_shows_zero_defaults():
    out = " ".join(run_cli("--help", command="distill").stdout.split())
    assert "MoE layer whose router is distilled (default: 0)" in out and "(default: 0)" in out
    assert "--seed" in out and "--overwrite" in out and "--doc-separator" in out
    assert "15-19 minutes" in " ".join(run_cli("--help", command="demo").stdout.split())
