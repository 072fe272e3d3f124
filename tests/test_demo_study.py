"""`grouter demo --preset study` end to end at a toy size (the real one runs about an hour), and
its pieces: the domains, the measured data utilisation, the FLOPs count."""

import json
import math
from dataclasses import replace

import pytest
import torch

pytest.importorskip("tokenizers")

from grouter.demo import config, corpus, run_demo  # noqa: E402
from grouter.demo.domains import split_python  # noqa: E402
from grouter.demo.study import (BASELINES, BEST, LR_GRID, MULTIPLES, forward_flops_per_token,  # noqa: E402
                                measured_utilisation, reach_multiple)

TOY = replace(config.PRESETS["quick"], vocab_size=512, corpus_bytes=1_500_000, d_model=32, n_layers=1, n_heads=2,
              d_expert=32, seq_len=32, batch_size=8, target_tokens=2048, source_tokens=4096, distill_steps=4,
              distill_batches=2, tune_steps=3, tune_batches=2, grouter_d_model=32, grouter_heads=2, eval_points=2,
              val_windows=16, heldout_windows=8, dev_windows=8, seeds=2)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    files = corpus._stdlib_files()[:60]
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(config.PRESETS, "study", TOY)
        mp.setattr(corpus, "_stdlib_files", lambda: files)  # the domains from a few files
        out = tmp_path_factory.mktemp("study")
        run_demo(str(out), preset="study", jobs=1, progress=False)
        again = run_demo(str(out), preset="study", jobs=1, progress=False, resume=True)
    return out, json.loads((out / "report.json").read_text()), again


def test_the_study_runs_every_budget_seed_and_domain(study):
    out, report, _ = study
    s = report["study"]
    assert report["preset"] == "study" and s["seeds"] == [0, 1]
    for b in BASELINES:
        assert set(s["table"][b]) == {str(m) for m in MULTIPLES}
        for m in MULTIPLES:
            assert len(s["table"][b][str(m)]["per_seed"]) == 2
    sel = s["lr_selection"]
    assert sel["split"] == "dev" and sel["best_baseline"] in BASELINES
    for b, v in sel["per_baseline"].items():
        assert v["lr"] in LR_GRID and v["dev_loss_at_lr"] == min(v["dev_loss"].values())
    # each budget has its own schedule: its tokens are the multiple's
    run = json.loads((out / "stages" / "chosen_hash_x4_s1.json").read_text())
    assert run["tokens"] == 4 * TOY.target_steps * TOY.tokens_per_step and run["multiple"] == 4
    assert run["lr"] == sel["per_baseline"]["hash"]["lr"]
    # independent sources: one per seed, and every Grouter seed read its own
    for k in (0, 1):
        meta = json.loads((out / "stages" / f"grouter_s{k}.json").read_text())
        assert meta["source"] == f"strong_s{k}"
    assert len(set(s["costs"]["source_val_loss_per_seed"])) == 2
    ds = s["domain_shift"]
    assert set(ds["table"]) == {"grouter_prose", "grouter_prose_tuned", "grouter_code", BEST}
    prose = json.loads((out / "stages" / "grouter_prose_tuned_s0.json").read_text())
    assert (prose["source"], prose["distilled_on"], prose["tuned_on"], prose["routes"]) == \
        ("prose_s0", "prose", "code", "code")
    assert json.loads((out / "stages" / "grouter_prose_s0.json").read_text())["tuned_on"] == "prose"
    c = s["costs"]
    assert 0 < c["forward_flops_per_token"]["grouter_over_target"] and c["parameters"]["grouter"] > 0
    assert c["tokens"]["grouter_run_total"] > c["tokens"]["per_grouter_run"]["target"]
    md = (out / "report.md").read_text()
    for q in ("Half the data?", "Source variance?", "Context or clustering?", "Domain shift?"):
        assert q in md


def test_the_study_resumes_without_rerunning(study):
    out, report, again = study
    assert again["study"] == report["study"]
    assert len(json.loads((out / "stages" / "wall_seconds.json").read_text())) == 2


def test_a_run_chosen_at_1x_seed_0_is_the_sweeps_own(study):
    out, report, _ = study
    lr = report["study"]["lr_selection"]["per_baseline"]["learned_aux"]["lr"]
    chosen = json.loads((out / "stages" / "chosen_learned_aux_x1_s0.json").read_text())
    sweep = json.loads((out / "stages" / f"run_learned_aux_lr{lr:g}_s0.json").read_text())
    assert chosen["final_val_loss"] == sweep["final_val_loss"]


def test_split_python_keeps_prose_and_code_apart():
    src = ('"""Module doc."""\nimport os  # why: é\nx = "é"  # ça\n\n'
           'def f(a):\n    """Doc of f.\n\n    more"""\n    s = "not a doc"\n    return a  # ret\n')
    prose, code = split_python(src)
    assert "Module doc." in prose and "Doc of f." in prose and "why: é" in prose and "ça" in prose
    assert "not a doc" not in prose
    assert code == 'import os\nx = "é"\ndef f(a):\n    s = "not a doc"\n    return a\n'
    with pytest.raises(SyntaxError):
        split_python("def (:\n")


def test_reach_multiple_interpolates_in_log2_budgets():
    losses = {1: 2.0, 2: 1.8, 4: 1.6}
    assert reach_multiple(losses, 2.1) == (1.0, 1)
    assert reach_multiple(losses, 1.8) == (2.0, 2)
    value, smallest = reach_multiple(losses, 1.7)
    assert smallest == 4 and value == pytest.approx(2 ** 1.5)
    assert reach_multiple(losses, 1.5) == (None, None)


def test_measured_utilisation_needs_every_seed():
    base = {1: {0: 2.0, 1: 2.0}, 2: {0: 1.8, 1: 1.9}, 4: {0: 1.6, 1: 1.7}}
    u = measured_utilisation({0: 1.8, 1: 1.7}, base)
    assert u["mean"] == pytest.approx(math.sqrt(2 * 4)) and u["ci95"] is not None
    u = measured_utilisation({0: 1.8, 1: 1.65}, base)
    assert u["mean"] is None and "more than 4x" in u["note"]


def test_forward_flops_count_active_experts_and_attention():
    from grouter.demo.lm import MoELM

    m = MoELM(16, 1, 2, 4, 1, 8, 0, None, vocab=32)
    f = forward_flops_per_token(m, seq_len=3)
    expert = sum(p.numel() for p in m.blocks[0].moe.experts.parameters())
    dense = sum(x.weight.numel() for x in m.modules() if isinstance(x, torch.nn.Linear))
    assert f["flops"] == 2 * (dense + expert / 4) + 4 * 2 * 16


def test_a_chosen_run_reads_only_the_sweep_it_depends_on(tmp_path):
    # a baseline's chosen runs wait on its own sweep only: the other baselines' may not exist yet
    from grouter.demo.jobs import Context, run_file
    from grouter.demo.study import run_chosen

    ctx = Context.make(tmp_path, TOY, None, "cpu", False, study=True)
    ctx.stages.mkdir(parents=True)
    for lr, dev in zip(LR_GRID, (2.0, 1.5, 1.7)):
        run_file(ctx, "hash", 0, 1, lr).write_text(json.dumps(dict(seed=0, final_dev_loss=dev, final_val_loss=dev + 1,
                                                                    lr=lr)))
    result = run_chosen(ctx, "hash", 0, 1, None)
    assert result["lr"] == LR_GRID[1] and result["final_val_loss"] == 2.5 and result["baseline"] == "hash"
