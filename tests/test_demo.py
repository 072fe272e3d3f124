"""`grouter demo --quick` end to end, read as the issue's checker reads report.json; resume."""

import json
import math
import os

import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("tokenizers")

from grouter import Grouter  # noqa: E402
from grouter.demo import run_demo  # noqa: E402
from grouter.demo.config import CONTEXT_FREE, GROUTER_RUNS, RUNS  # noqa: E402
from grouter.router import PredispatchReader  # noqa: E402


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    run_demo(str(out), quick=True, progress=False)
    return out


@pytest.fixture(scope="module")
def report(quick):
    return json.loads((quick / "report.json").read_text())


def test_every_run_with_its_seeds(report):
    assert set(report["runs"]) == set(RUNS) - {"learned_bias"}  # not in the default configurations
    for name, run in report["runs"].items():
        tokens = [t for t, _ in run["val_curve"]]
        assert tokens == sorted(tokens) and len(tokens) >= 3, name
        assert all(math.isfinite(v) for _, v in run["val_curve"]), name
        assert len(run["final_val_loss_per_seed"]) == run["seeds"] == len(report["seeds"][name])
        assert run["final_val_loss"] == pytest.approx(sum(run["final_val_loss_per_seed"]) / run["seeds"])
        assert run["tokens_per_s"] > 0 and run["max_vio"] >= 0
        assert run["per_seed"][0]["tokens"] == run["val_curve"][-1][0]
    for name in ("grouter", "hash_balanced", "learned_aux"):
        assert report["runs"][name]["seeds"] >= 2
    assert report["config"]["val_windows"] >= 256


def test_sources_tokenizer_and_budget(report):
    target = report["config"]["target_tokens"]
    assert report["tokenizer"]["kind"] == "bpe" and report["tokenizer"]["vocab_size"] == report["config"]["vocab_size"]
    assert report["tokenizer"]["bytes_per_token"] > 1.5  # subwords, not bytes
    assert report["source"]["tokens"] >= 5 * target * 0.99  # whole steps
    assert abs(report["source_weak"]["tokens"] - target) <= report["config"]["batch_size"] * report["config"]["seq_len"]
    for s in (report["source"], report["source_weak"]):
        assert math.isfinite(s["val_loss"]) and s["seconds"] > 0
    assert report["source"]["val_loss"] < report["source_weak"]["val_loss"]
    assert {"source_strong", "source_weak", "tokenizer", "target_grouter", "distill_grouter", "tune_grouter",
            "predispatch_grouter"} <= set(report["cost"])


def test_statistics_fields(report):
    for name in GROUTER_RUNS:
        u = report["data_utilization"][name]
        for v in (u, u["vs_learned_aux"]):
            assert v["definition"] == "paper" and v["baseline"] in report["runs"]
            assert (v["value"] is None and v["reason"]) or v["value"] > 0
        assert u["vs_learned_aux"]["baseline"] == "learned_aux"
    comps = {c["b"]: c for c in report["comparisons"]}
    assert set(comps) == set(report["runs"]) - {"grouter"}
    for c in comps.values():
        assert c["a"] == "grouter" and c["seeds"]
        a = {r["seed"]: r["final_val_loss"] for r in report["runs"]["grouter"]["per_seed"]}
        b = {r["seed"]: r["final_val_loss"] for r in report["runs"][c["b"]]["per_seed"]}
        assert c["mean_diff"] == pytest.approx(sum(a[s] - b[s] for s in c["seeds"]) / len(c["seeds"]))
        if len(c["seeds"]) >= 2:
            lo, hi = c["ci95"]
            assert lo <= c["mean_diff"] <= hi
        else:
            assert c["ci95"] is None and c["reason"]
    h = report["distill"]["heldout"]
    assert h["kl_after"] < h["kl_before"] and 0 <= h["topk_agreement"] <= 1


def test_leak_audit(report):
    audit = report["leak_audit"]
    assert audit["bidirectional_vs_causal"]["a"] == "grouter_bidirectional" and audit["bidirectional_vs_causal"]["measures"]
    for name, (_, causal) in GROUTER_RUNS.items():
        if name in CONTEXT_FREE:  # a table reads no other token: nothing to leak
            continue
        run = report["runs"][name]
        assert math.isfinite(run["audit_prefix_only_val_loss"]) and run["audit_windows"] == 256 // 4
        if causal:  # prefix-only routes are its own routes
            assert abs(run["audit_prefix_only_val_loss"] - run["audit_own_val_loss"]) < 1e-4, name


def test_splits_selection_on_dev_and_reporting_on_validation(report):
    splits = report["splits"]
    assert any("final_val_loss" in k and v == "validation" for k, v in splits.items())
    assert any("tuning_dev_max_vio" in k and v == "dev" for k, v in splits.items())
    d = report["distill"]
    assert "dev" in d["selected_on"] and "validation" in d["evaluated_on"]
    assert d["tuning_dev_max_vio"]["after"] <= d["tuning_dev_max_vio"]["before"]  # the best state, chosen on dev
    assert report["tokenizer"]["dev_tokens"] > 0
    for run in report["runs"].values():
        assert run["split"]["final_val_loss"] == "validation" and run["split"]["max_vio"] == "training"
    assert all(c["split"] == "validation" for c in report["comparisons"])
    assert d["heldout"]["split"] == d["tuning_heldout_max_vio"]["split"] == "validation"
    assert d["tuning_dev_max_vio"]["split"] == "dev"
    assert len(report["versions"]["commit"]) >= 7 and "cpu" in report["versions"]["numerics"]


def test_hash_balanced_is_balanced_and_spread(report):
    t = report["hash_tables"]["hash_balanced"]
    assert t["max_over_mean_load"] <= 1.02 and t["measured_on"] == "training split"
    assert t["distinct_sets"] >= 0.9 * t["possible_sets"]


def test_grouter_table_is_an_exported_context_free_table(quick, report):
    from grouter import TableRouter

    assert report["runs"]["grouter_table"]["seeds"] >= 2
    for meta in report["grouters"]["grouter_table"]:
        assert meta["table_same_routes"] == 1.0 and meta["table_max_weight_diff"] < 1e-6
        table = TableRouter.load(quick / "stages" / f"grouter_table_s{meta['seed']}" / meta["table"])
        assert table.checksum() == meta["table_checksum"] and table.num_experts == report["config"]["target_experts"]
        assert meta["parameters"] < report["grouters"]["grouter"][0]["parameters"]  # no blocks
    assert "grouter_table" in {c["b"] for c in report["comparisons"]}


def test_grouter_seeds_are_distilled_apart_and_routes_predispatched(quick, report):
    stages = quick / "stages"
    g0, g1 = (Grouter.load(stages / f"grouter_s{s}") for s in (0, 1))
    assert g0.checksum() != g1.checksum()
    reader = PredispatchReader(stages / "grouter_s0" / "routes", g0)
    cfg = report["config"]
    assert len(reader) == cfg["target_tokens"] // (cfg["batch_size"] * cfg["seq_len"]) * cfg["batch_size"]
    tokens, ids, _ = reader[0:8]
    # The worker routed in other batches and with one thread: near-tied logits may round the other way.
    assert (g0.route(tokens)[0] == ids).float().mean() > 0.99


def test_plots_and_markdown(quick):
    for name in ("val_loss.png", "expert_load.png", "affinity.png"):
        assert (quick / name).stat().st_size > 1000
    md = (quick / "report.md").read_text()
    assert "| grouter |" in md and "4.28" in md and "Leak audit" in md and "95% CI" in md


def test_resume_keeps_finished_stages(quick):
    stamps = {p: p.stat().st_mtime_ns for p in (quick / "stages").rglob("*") if p.is_file()}
    run_demo(str(quick), quick=True, resume=True, progress=False, jobs=1)
    assert {p: p.stat().st_mtime_ns for p in (quick / "stages").rglob("*") if p.is_file()} == stamps
    assert os.path.exists(quick / "report.md")


def test_resume_refuses_other_settings(quick, tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("another corpus\n" * 20_000)
    with pytest.raises(ValueError, match="other settings.*corpus"):
        run_demo(str(quick), quick=True, resume=True, corpus=str(text), progress=False)


def test_resume_with_more_seeds_adds_only_their_jobs(quick):
    before = {p.name for p in (quick / "stages").iterdir()}
    report = run_demo(str(quick), quick=True, resume=True, seeds=3, progress=False, jobs=1)
    added = {p.name for p in (quick / "stages").iterdir()} - before
    assert added == {"run_grouter_s2.json", "grouter_s2.json", "grouter_s2", "run_hash_balanced_s2.json",
                     "run_learned_aux_s2.json"}
    assert report["runs"]["grouter"]["seeds"] == 3 and report["runs"]["grouter_weak"]["seeds"] == 2
