"""The demo's parts against plain references: statistics, the balanced hash, BPE bytes, prefix-only
routes, the job plan."""

import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

from grouter.demo.config import PRESETS
from grouter.demo.corpus import Corpus, load_corpus
from grouter.demo.lm import balanced_hash_table, hash_table, leak_free_routes
from grouter.demo.stats import T975, data_utilization, mean_ci, paired, t975, tokens_to_reach


def t_pdf(x, df):
    return math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2)) * (1 + x * x / df) ** (-(df + 1) / 2)


@pytest.mark.parametrize("df", [1, 2, 3, 5, 10, 30])
def test_t_quantiles_cover_95_percent(df):
    q = t975(df)
    n = 4000
    mass = sum(t_pdf(-q + (i + 0.5) * 2 * q / n, df) for i in range(n)) * 2 * q / n  # midpoint rule
    assert mass == pytest.approx(0.95, abs=1e-3)
    assert len(T975) == 30 and t975(31) == 1.96


def test_paired_interval_matches_the_textbook():
    rng = np.random.default_rng()
    a = {s: float(v) for s, v in enumerate(rng.normal(2.0, 0.05, 4))}
    b = {s: float(v) for s, v in enumerate(rng.normal(2.1, 0.05, 5))}  # seed 4 has no partner
    d = [a[s] - b[s] for s in range(4)]
    half = 3.182 * statistics.stdev(d) / math.sqrt(4)
    out = paired(a, b)
    assert out["seeds"] == [0, 1, 2, 3]
    assert out["mean_diff"] == pytest.approx(statistics.fmean(d))
    assert out["ci95"] == pytest.approx([statistics.fmean(d) - half, statistics.fmean(d) + half])
    one = paired({0: 1.0}, {0: 1.5, 1: 2.0})
    assert one["mean_diff"] == -0.5 and one["ci95"] is None and one["reason"]
    assert paired({0: 1.0}, {1: 1.0})["seeds"] == []
    assert mean_ci([1.0, 1.0])["ci95"] == [1.0, 1.0]


def test_data_utilization_the_papers_way():
    base = dict(val_curve=[[100, 3.0], [200, 2.5], [400, 2.0]], final_val_loss=2.0)
    fast = dict(val_curve=[[100, 2.5], [200, 2.0], [400, 1.8]], final_val_loss=1.8)
    u = data_utilization(fast, "hash", base)
    assert u["value"] == pytest.approx(400 / 200) and u["definition"] == "paper" and u["baseline"] == "hash"
    between = dict(val_curve=[[100, 2.5], [200, 2.2], [400, 1.8]], final_val_loss=1.8)
    need = 200 + 200 * (2.2 - 2.0) / (2.2 - 1.8)
    assert data_utilization(between, "hash", base)["value"] == pytest.approx(400 / need)
    slow = dict(val_curve=[[100, 3.5], [200, 3.0], [400, 2.4]], final_val_loss=2.4)
    u = data_utilization(slow, "hash", base)
    assert u["value"] is None and "never reaches" in u["reason"]
    early = data_utilization(dict(val_curve=[[100, 1.9], [400, 1.5]], final_val_loss=1.5), "hash", base)
    assert early["value"] == 4.0 and "lower bound" in early["reason"]
    assert tokens_to_reach(base["val_curve"], 2.75) == pytest.approx(150)


@pytest.mark.parametrize("vocab,E,K", [(4096, 8, 2), (4096, 32, 8), (300, 4, 1), (500, 6, 6)])
def test_balanced_hash_balances_token_frequency_and_spreads_the_sets(vocab, E, K):
    # Zipf-like frequencies as BPE tokens have (no id above a few percent), a few never seen.
    rng = np.random.default_rng()
    freq = torch.from_numpy((1e6 / (rng.permutation(vocab) + 10)).round()).long()
    freq[rng.choice(vocab, vocab // 50, replace=False)] = 0
    table = balanced_hash_table(freq, E, K, seed=int(rng.integers(1 << 30)))
    assert table.shape == (vocab, K)
    assert all(len(set(row)) == K for row in table.tolist()) and int(table.min()) >= 0 and int(table.max()) < E
    load = torch.zeros(E, dtype=torch.float64).index_add_(0, table.reshape(-1), freq.double().repeat_interleave(K))
    assert float(load.max() / load.mean()) <= 1.02
    sets = {tuple(row) for row in table.tolist()}
    # the rarest ids take the K least loaded experts once the others are full, so sets repeat a
    # little there: 0.88-0.97 of 4096 at E=32, K=8 over 12 seeds (0.9 failed one in 12)
    assert len(sets) >= 0.85 * min(math.comb(E, K), vocab)
    with pytest.raises(ValueError, match="top_k"):
        balanced_hash_table(freq, 2, 3)


def test_balanced_hash_is_a_function_of_its_seed():
    freq = torch.arange(1000, 0, -1)
    assert torch.equal(balanced_hash_table(freq, 8, 2, seed=1), balanced_hash_table(freq, 8, 2, seed=1))
    assert not torch.equal(balanced_hash_table(freq, 8, 2, seed=1), balanced_hash_table(freq, 8, 2, seed=2))


def test_bpe_bytes_and_cache(tmp_path):
    pytest.importorskip("tokenizers")
    from grouter.demo.subwords import build_token_corpus, encode, load_token_corpus, token_bytes, train_bpe

    data, desc = load_corpus(None)
    corpus = Corpus(data, desc, max_bytes=400_000)
    text = corpus.val_bytes.tobytes().decode("utf-8", errors="replace")
    tok = train_bpe(corpus.train_bytes.tobytes().decode("utf-8", errors="replace"), 600)
    ids = encode(tok, text)
    assert int(token_bytes(tok)[torch.from_numpy(ids.astype(np.int64))].sum()) == len(text.encode("utf-8"))
    assert tok.decode(ids.tolist()) == text
    with pytest.raises(ValueError, match="vocabulary"):
        train_bpe("abc", 100)
    built = build_token_corpus(corpus, 600, tmp_path)
    again = load_token_corpus(tmp_path)
    assert torch.equal(built.train, again.train) and torch.equal(built.token_bytes, again.token_bytes)
    assert build_token_corpus(corpus, 700, tmp_path).vocab_size == 700  # another vocabulary: rebuilt
    with pytest.raises(ValueError, match="no finished token corpus"):
        load_token_corpus(tmp_path / "nothing")


@pytest.mark.parametrize("causal", [True, False])
def test_prefix_only_routes(causal):
    import warnings

    from grouter import Grouter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = Grouter(300, 8, 2, d_model=32, n_layers=2, n_heads=2, causal=causal).eval()
    x = torch.randint(0, 300, (3, 20))
    ids, w = leak_free_routes(g, x)
    full_ids, full_w = g.route(x)
    by_prefix = [g.route(x[:, :t + 1]) for t in range(20)]
    ref_ids = torch.stack([i[:, -1] for i, _ in by_prefix], 1).reshape(60, 2)
    ref_w = torch.stack([v[:, -1] for _, v in by_prefix], 1).reshape(60, 2)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-6)
    if causal:
        assert torch.equal(ids, full_ids.reshape(60, 2))
    else:
        assert not torch.equal(ids, full_ids.reshape(60, 2))


def test_job_plan_is_ordered_by_dependencies(tmp_path):
    from grouter.demo.jobs import Context
    from grouter.demo.pipeline import plan_jobs

    ctx = Context.make(tmp_path, PRESETS["default"], None, "cpu", False)
    jobs = plan_jobs(ctx)
    keys = [j.key for j in jobs]
    assert len(set(keys)) == len(keys) and keys[0] == "source:strong"
    for i, job in enumerate(jobs):
        assert all(d in keys[:i] for d in job.deps), job.key
    runs = [j for j in jobs if j.kind == "run"]
    cfg = PRESETS["default"]
    assert len(runs) == sum(cfg.seeds_of(n) for n in {j.args[0] for j in runs})
    assert {j.args[0] for j in runs if j.args[1] == 2} == {"grouter", "hash_balanced", "learned_aux"}
    assert all(isinstance(j.output, Path) for j in jobs)


def test_readme_demo_tables_come_from_the_committed_report_of_todays_default():
    # Numbers in the README are regenerated, not typed: the committed report was made with the
    # default configuration as it is now, and the README holds exactly its tables.
    from dataclasses import asdict

    from grouter.demo.tables import BEGIN, END, tables

    root = Path(__file__).resolve().parents[1]
    report = json.loads((root / "demo_results" / "default" / "report.json").read_text())
    assert report["config"] == asdict(PRESETS["default"]), "rerun `grouter demo` and commit its report"
    readme = (root / "README.md").read_text()
    assert readme.count(BEGIN) == 1 and readme.count(END) == 1
    block = readme.split(BEGIN)[1].split(END)[0].strip()
    assert block == tables(report), "regenerate: python -m grouter.demo.tables demo_results/default/report.json"


def test_readme_study_tables_come_from_the_committed_study_report():
    # The study (about an hour, not run in CI) is committed once per numerics: its configuration is
    # today's study preset and the README holds exactly its answers and tables.
    from dataclasses import asdict

    from grouter.demo.tables import STUDY_BEGIN, STUDY_END, tables

    root = Path(__file__).resolve().parents[1]
    report = json.loads((root / "demo_results" / "study" / "report.json").read_text())
    assert report["preset"] == "study"
    assert report["config"] == asdict(PRESETS["study"]), "rerun `grouter demo --preset study` and commit its report"
    readme = (root / "README.md").read_text()
    assert readme.count(STUDY_BEGIN) == 1 and readme.count(STUDY_END) == 1
    block = readme.split(STUDY_BEGIN)[1].split(STUDY_END)[0].strip()
    assert block == tables(report), "regenerate: python -m grouter.demo.tables demo_results/study/report.json"
