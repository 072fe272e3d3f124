"""`grouter demo`: the whole method end to end, every stage checkpointed in --out.

source MoE LM (learned router + aux loss) -> distil a causal and a bidirectional Grouter from its
first MoE layer -> affinity -> fold to the target's expert count -> tune on a slice of target data
-> target MoE LMs with identical architecture, initialisation, data order and token budget:
learned_aux, learned_bias, hash, grouter (causal), grouter_bidirectional -> leak audit -> report.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from .corpus import VOCAB, Corpus, load_corpus

BASELINES = ("learned_aux", "learned_bias", "hash")
GROUTER_RUNS = ("grouter", "grouter_bidirectional")
RUNS = BASELINES + GROUTER_RUNS
ROUTERS = {"learned_aux": "softmax", "learned_bias": "sigmoid"}


@dataclass
class Config:
    """The demo's sizes, token budgets and seeds (presets: default, quick, fine)."""

    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_expert: int = 128
    source_experts: int = 16
    target_experts: int = 8
    top_k: int = 2
    seq_len: int = 128
    batch_size: int = 16
    lr: float = 3e-3
    source_tokens: int = 800_000
    target_tokens: int = 800_000
    distill_steps: int = 300
    tune_steps: int = 100
    tune_batches: int = 16
    grouter_d_model: int = 128
    grouter_layers: int = 2
    grouter_heads: int = 4
    eval_points: int = 12
    val_windows: int = 64
    seeds: int = 2

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


PRESETS: Dict[str, Config] = {
    "default": Config(),
    "quick": Config(d_model=64, n_layers=2, n_heads=2, d_expert=64, source_experts=8, target_experts=4, seq_len=64,
                    batch_size=8, source_tokens=120_000, target_tokens=120_000, distill_steps=80, tune_steps=40,
                    tune_batches=8, grouter_d_model=64, grouter_layers=1, grouter_heads=2, eval_points=6,
                    val_windows=16),
    # The paper's fine-grained regime: many small experts, top-8, folded 64 -> 32.
    "fine": Config(d_expert=32, source_experts=64, target_experts=32, top_k=8),
}

PAPER = {
    "source": "Grouter (arXiv 2603.06626): Qwen3-30B-A3B source, 128 experts top-8, 3-block d=512 bidirectional Grouter",
    "data_utilization": 4.28,
    "same_loss_with_fraction_of_data": 0.233,
    "throughput_gain_8gpu": 0.335,
    "tuning_max_vio": {"before": 8.0, "after": 0.5},
}


def _log(msg: str) -> None:
    print(f"[grouter demo] {msg}", flush=True)


def _bar(total: int, desc: str, unit: str = "tok"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, leave=False)


def _schedule(step: int, steps: int, warmup: int) -> float:
    return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))


def train_lm(cfg: Config, corpus: Corpus, name: str, seed: int, tokens: int, num_experts: int,
             router: Optional[str] = None, route=None, device: str = "cpu", progress: bool = True) -> Dict:
    """Train one MoE LM; returns its curve, throughput, routing balance (and the model)."""
    from ..nn import Routing
    from .lm import AUX_LOSS_COEF, MoELM, evaluate, routing_summary

    model = MoELM(cfg.d_model, cfg.n_layers, cfg.n_heads, num_experts, cfg.top_k, cfg.d_expert, seed, router).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    steps = max(1, tokens // cfg.tokens_per_step)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, steps, warmup))
    val = corpus.val_windows(cfg.val_windows, cfg.seq_len).to(device)
    eval_at = {round(steps * (i + 1) / cfg.eval_points) for i in range(cfg.eval_points)}
    data = corpus.train_batches(seed, cfg.batch_size, cfg.seq_len)
    curve, seconds = [], 0.0
    bar = _bar(steps * cfg.tokens_per_step, f"{name} s{seed}") if progress else None
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        x = next(data).to(device)
        routing = Routing.prepare(*route(x), num_experts) if route is not None else None
        logits = model(x, routing)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        if router == "softmax":
            loss = loss + AUX_LOSS_COEF * model.aux_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        seconds += time.perf_counter() - t0
        if bar is not None:
            bar.update(cfg.tokens_per_step)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if step in eval_at:
            curve.append([step * cfg.tokens_per_step, evaluate(model, val, route)])
    if bar is not None:
        bar.close()
    result = dict(name=name, seed=seed, val_curve=curve, final_val_loss=curve[-1][1],
                  tokens=steps * cfg.tokens_per_step, seconds=seconds,
                  tokens_per_s=steps * cfg.tokens_per_step / max(seconds, 1e-9), **routing_summary(model))
    return dict(result=result, model=model)


class Pipeline:
    """The demo's stages (source, Grouters, target runs, leak audit, report), each checkpointed in `out`."""

    def __init__(self, out: Path, cfg: Config, corpus_path: Optional[str], device: str, resume: bool,
                 jobs: int, progress: bool = True):
        self.out, self.cfg, self.device, self.resume, self.jobs, self.progress = out, cfg, device, resume, jobs, progress
        self.stages = out / "stages"
        self.stages.mkdir(parents=True, exist_ok=True)
        self.corpus_path = corpus_path
        data, desc = load_corpus(corpus_path)
        self.corpus = Corpus(data, desc)
        self.cost: Dict[str, Dict[str, float]] = {}

    # -- stages ------------------------------------------------------------------------------------

    def _done(self, name: str) -> Optional[Path]:
        path = self.stages / name
        return path if self.resume and path.exists() else None

    def source(self):
        from .lm import MoELM

        path = self.stages / "source.pt"
        if self._done("source.pt"):
            state = torch.load(path, weights_only=False)
            _log(f"source: resumed ({state['result']['final_val_loss']:.3f} nats)")
        else:
            run = train_lm(self.cfg, self.corpus, "source", 0, self.cfg.source_tokens, self.cfg.source_experts,
                           router="softmax", device=self.device, progress=self.progress)
            state = dict(result=run["result"], model=run["model"].state_dict())
            torch.save(state, path)
            r = run["result"]
            _log(f"source: {r['tokens']:,} tokens in {r['seconds']:.0f} s, val {r['final_val_loss']:.3f} nats, "
                 f"MaxVio {r['max_vio']:.2f}")
        c = self.cfg
        model = MoELM(c.d_model, c.n_layers, c.n_heads, c.source_experts, c.top_k, c.d_expert, 0, "softmax")
        model.load_state_dict(state["model"])
        self.cost["source"] = dict(tokens=state["result"]["tokens"], seconds=state["result"]["seconds"])
        return model.to(self.device).eval(), state["result"]

    def grouters(self, source):
        import warnings

        from ..router import Grouter, affinity, distill, fold, fold_groups, heldout_metrics, teacher_logits, tune

        c, out = self.cfg, {}
        batches = [next(self.corpus.train_batches(10_000 + i, c.batch_size, c.seq_len)) for i in range(32)]
        tune_batches = [next(self.corpus.train_batches(20_000 + i, c.batch_size, c.seq_len))
                        for i in range(c.tune_batches)]
        # Quality figures on held-out text: validation windows the source, Grouters and tuning never train on.
        held = self.corpus.val_windows(64, c.seq_len).to(self.device)
        held_teacher = teacher_logits(source, held, progress=False)
        held_batches = list(held.split(c.batch_size))
        info = {}
        for causal in (True, False):
            name = "grouter" if causal else "grouter_bidirectional"
            path = self.stages / name
            if self._done(name):
                out[name] = Grouter.load(path)
                info[name] = json.loads((self.stages / f"{name}.json").read_text())
                _log(f"{name}: resumed")
                continue
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the bidirectional warning: that leak is what we measure
                g = Grouter(VOCAB, c.source_experts, c.top_k, d_model=c.grouter_d_model, n_layers=c.grouter_layers,
                            n_heads=c.grouter_heads, causal=causal, source="demo source MoE, layer 0").to(self.device)
            before = heldout_metrics(g, held_teacher)
            distill(g, source, batches, steps=c.distill_steps, progress=self.progress)
            after = heldout_metrics(g, held_teacher)
            kl_before, kl_after = before["kl"], after["kl"]
            t_distill = time.perf_counter() - t0
            A = affinity(g, batches)
            groups = fold_groups(A, c.target_experts)
            folded = fold(g, groups)
            t0 = time.perf_counter()
            tuned = tune(folded, tune_batches, steps=c.tune_steps, heldout=held_batches, progress=self.progress)
            t_tune = time.perf_counter() - t0
            folded.save(path)
            meta = dict(kl_before=kl_before, kl_after=kl_after, topk_agreement_before=before["topk_agreement"],
                        topk_agreement=after["topk_agreement"], distill_seconds=t_distill, tune_seconds=t_tune,
                        distill_tokens=c.distill_steps * c.tokens_per_step,
                        tune_tokens=c.tune_steps * c.tokens_per_step, affinity=A.tolist(), groups=groups.tolist(),
                        max_vio_folded=tuned["max_vio_before"], max_vio_tuned=tuned["max_vio_after"])
            (self.stages / f"{name}.json").write_text(json.dumps(meta))
            out[name], info[name] = folded, meta
            _log(f"{name}: held-out KL to the source router {kl_before:.3f} -> {kl_after:.3f}, top-{c.top_k} "
                 f"agreement {after['topk_agreement']:.3f}; fold {c.source_experts} -> {c.target_experts}; "
                 f"tune held-out MaxVio {tuned['max_vio_before']:.2f} -> {tuned['max_vio_after']:.2f}")
        for name, meta in info.items():
            self.cost[f"distill_{name}"] = dict(tokens=meta["distill_tokens"], seconds=meta["distill_seconds"])
            self.cost[f"tune_{name}"] = dict(tokens=meta["tune_tokens"], seconds=meta["tune_seconds"])
        return out, info

    def targets(self) -> Dict[str, List[Dict]]:
        specs = [(name, seed) for name in RUNS
                 for seed in range(self.cfg.seeds if name in ("learned_aux", "grouter") else 1)]
        todo = [(n, s) for n, s in specs if not self._done(f"run_{n}_s{s}.json")]
        if todo:
            _log(f"targets: {len(todo)} runs of {self.cfg.target_tokens:,} tokens"
                 + (f", {self.jobs} at a time" if self.jobs > 1 else ""))
        args = [(str(self.out), asdict(self.cfg), self.corpus_path, self.device, n, s,
                 self.progress and self.jobs == 1) for n, s in todo]
        if self.jobs > 1 and len(todo) > 1:
            import multiprocessing as mp

            with ProcessPoolExecutor(self.jobs, mp_context=mp.get_context("spawn")) as pool:
                for r in pool.map(_run_target, args):
                    _log(_summary(r))
        else:
            for a in args:
                _log(_summary(_run_target(a, self.corpus)))
        runs: Dict[str, List[Dict]] = {}
        for n, s in specs:
            runs.setdefault(n, []).append(json.loads((self.stages / f"run_{n}_s{s}.json").read_text()))
        return runs


def _summary(r: Dict) -> str:
    extra = f", leak-free {r['leak_free_final_val_loss']:.4f}" if "leak_free_final_val_loss" in r else ""
    return (f"{r['name']} seed {r['seed']}: val {r['final_val_loss']:.4f} nats{extra}, "
            f"{r['tokens_per_s']:,.0f} tok/s, MaxVio {r['max_vio']:.2f}")


@functools.lru_cache(maxsize=1)
def _worker_corpus(corpus_path: Optional[str]) -> Corpus:
    """A worker process reads the corpus once for all the runs it is given."""
    return Corpus(*load_corpus(corpus_path))


def _run_target(args, corpus: Optional[Corpus] = None) -> Dict:
    """One target run (also in a worker process, one thread)."""
    import warnings

    from ..router import Grouter
    from .lm import evaluate, fixed_router, leak_free_routes

    out, cfg, corpus_path, device, name, seed, progress = args
    cfg = Config(**cfg)
    if corpus is None:
        torch.set_num_threads(1)
        corpus = _worker_corpus(corpus_path)
    stages = Path(out) / "stages"
    route, g = None, None
    if name == "hash":
        route = fixed_router("hash", cfg.target_experts, cfg.top_k)
    elif name in GROUTER_RUNS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            g = Grouter.load(stages / name, map_location=device).eval()
        route = fixed_router("grouter", cfg.target_experts, cfg.top_k, g)
    run = train_lm(cfg, corpus, name, seed, cfg.target_tokens, cfg.target_experts, router=ROUTERS.get(name),
                   route=route, device=device, progress=progress)
    result = run["result"]
    if g is not None:  # the leak audit: routes an autoregressive model could compute
        val = corpus.val_windows(cfg.val_windows, cfg.seq_len).to(device)
        routes = [leak_free_routes(g, val[i:i + 16]) for i in range(0, val.shape[0], 16)]
        result["leak_free_final_val_loss"] = evaluate(run["model"], val, routes=routes)
    (stages / f"run_{name}_s{seed}.json").write_text(json.dumps(result))
    return result


def versions() -> Dict[str, str]:
    import numpy

    from .. import __version__

    v = dict(grouter=__version__, torch=torch.__version__, numpy=numpy.__version__, python=platform.python_version(),
             machine=platform.machine(), cpus=str(os.cpu_count()))
    try:
        import transformers

        v["transformers"] = transformers.__version__
    except ImportError:
        pass
    return v


def run_demo(out: str, quick: bool = False, corpus: Optional[str] = None, preset: str = "default",
             seeds: Optional[int] = None, device: str = "cpu", resume: bool = False, jobs: Optional[int] = None,
             progress: bool = True) -> Dict:
    from .report import write_report

    t_start = time.perf_counter()
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (have {', '.join(PRESETS)})")
    cfg = PRESETS["quick" if quick else preset]
    if seeds is not None:
        cfg = replace(cfg, seeds=max(1, seeds))
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no GPU")
    jobs = jobs if jobs is not None else (2 if device == "cpu" and (os.cpu_count() or 1) >= 2 and not quick else 1)
    out_path = Path(out)
    _log(f"writing to {out_path}; preset {'quick' if quick else preset}, {cfg.seeds} seeds, device {device}")
    p = Pipeline(out_path, cfg, corpus, device, resume, jobs, progress)
    _log(f"corpus: {p.corpus.description}, {p.corpus.bytes / 1e6:.1f} MB "
         f"({p.corpus.train.numel() / 1e6:.1f} M train / {p.corpus.val.numel() / 1e6:.2f} M validation bytes)")
    source, source_result = p.source()
    grouters, info = p.grouters(source)
    runs = p.targets()
    for name, results in runs.items():
        p.cost[f"target_{name}"] = dict(tokens=sum(r["tokens"] for r in results),
                                        seconds=sum(r["seconds"] for r in results))
    report = write_report(out_path, cfg=asdict(cfg), runs=runs, source=source_result, grouters=info, cost=p.cost,
                          versions=versions(), paper=PAPER, corpus=p.corpus.description,
                          wall_seconds=time.perf_counter() - t_start)
    _log(f"done in {time.perf_counter() - t_start:.0f} s: {out_path / 'report.md'}")
    return report
