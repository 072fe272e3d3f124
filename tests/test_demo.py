"""`grouter demo --quick` end to end: every run reported, finite curves, plots, resume."""

import json
import math
import os

import pytest

pytest.importorskip("matplotlib")

from grouter.demo import run_demo  # noqa: E402

RUNS = ("learned_aux", "learned_bias", "hash", "grouter", "grouter_bidirectional")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    run_demo(str(out), quick=True, progress=False)
    return out


def test_report_has_every_run(quick):
    report = json.loads((quick / "report.json").read_text())
    assert set(report["runs"]) == set(RUNS)
    for name, run in report["runs"].items():
        tokens = [t for t, _ in run["val_curve"]]
        assert tokens == sorted(tokens) and len(tokens) >= 3, name
        assert all(math.isfinite(v) for _, v in run["val_curve"]), name
        assert math.isfinite(run["final_val_loss"]) and run["tokens_per_s"] > 0 and run["max_vio"] >= 0
    assert report["runs"]["learned_aux"]["seeds"] >= 2 and report["runs"]["grouter"]["seeds"] >= 2
    for name in ("grouter", "grouter_bidirectional"):
        assert math.isfinite(report["runs"][name]["leak_free_final_val_loss"])
        u = report["data_utilization"][name]
        assert u["value"] is None and u["reason"] or u["value"] > 0
    assert {"source", "target_grouter", "distill_grouter", "tune_grouter"} <= set(report["cost"])
    assert {"config", "seeds", "versions", "paper"} <= set(report)


def test_causal_audit_coincides(quick):
    run = json.loads((quick / "report.json").read_text())["runs"]["grouter"]
    assert abs(run["leak_free_final_val_loss"] - run["final_val_loss"]) < 1e-4


def test_plots_and_markdown(quick):
    for name in ("val_loss.png", "expert_load.png", "affinity.png"):
        assert (quick / name).stat().st_size > 1000
    md = (quick / "report.md").read_text()
    assert "| grouter |" in md and "4.28" in md and "Leak audit" in md


def test_resume_keeps_finished_stages(quick):
    stamps = {p.name: p.stat().st_mtime_ns for p in (quick / "stages").iterdir()}
    run_demo(str(quick), quick=True, resume=True, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in (quick / "stages").iterdir()} == stamps
    assert os.path.exists(quick / "report.md")
