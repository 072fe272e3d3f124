"""`grouter demo`: the whole method end to end, every job checkpointed in --out.

BPE tokens -> a strong source MoE LM (5x a target run's tokens) and a weak one (one run's tokens)
-> per seed, Grouters distilled from them (and a random one), folded to the target's experts,
tuned, their training routes pre-dispatched -> target MoE LMs with identical architecture,
initialisation, data order and budget per seed (Config.runs) -> leak audit -> report with paired
confidence intervals. Jobs run two at a time on a 2-core machine, in dependency order, the
longest chain (the strong source, its Grouters, their runs) first.
"""

from __future__ import annotations

import json
import os
import platform
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from .config import BASELINES, GROUTER_RUNS, PAPER, PRESETS, Config
from .corpus import Corpus, load_corpus
from .jobs import Context, grouter_dir, hash_tables_summary, run_file, run_job, source_path
from .subwords import build_token_corpus


def _log(msg: str) -> None:
    print(f"[grouter demo] {msg}", flush=True)


@dataclass
class Job:
    kind: str
    args: Tuple
    deps: Tuple[str, ...]
    output: Path  # written last by the job: its presence means done

    @property
    def key(self) -> str:
        return ":".join([self.kind, *map(str, self.args)])


def plan_jobs(ctx: Context) -> List[Job]:
    """Every job, in the order they are started when ready (the critical path first)."""
    cfg, st = ctx.config, ctx.stages
    sources = [Job("source", (w,), (), source_path(ctx, w)) for w in ("strong", "weak")]
    grouters, grouter_runs, baselines = [], [], []
    for name in cfg.runs:
        for seed in range(cfg.seeds_of(name)):
            run_out = run_file(ctx, name, seed)
            if name in GROUTER_RUNS:
                which = GROUTER_RUNS[name][0]
                deps = () if which == "random" else (f"source:{which}",)
                grouters.append(Job("grouter", (name, seed), deps, st / f"{name}_s{seed}.json"))
                grouter_runs.append(Job("run", (name, seed), (f"grouter:{name}:{seed}",), run_out))
            else:
                baselines.append(Job("run", (name, seed), (), run_out))
    strong_first = lambda j: GROUTER_RUNS.get(j.args[0], ("",))[0] != "strong"  # noqa: E731
    return sources + sorted(grouters, key=strong_first) + sorted(grouter_runs, key=strong_first) + baselines


def run_jobs(ctx: Context, jobs: List[Job], workers: int, resume: bool, runner=run_job) -> Dict[str, Dict]:
    """Run jobs whose dependencies are done, `workers` at a time (in this process when 1), each by
    runner(ctx, kind, *args, threads=...)."""
    done = {j.key for j in jobs if resume and j.output.exists()}
    if done:
        _log(f"resumed: {len(done)} of {len(jobs)} jobs already done")
    todo = [j for j in jobs if j.key not in done]
    results: Dict[str, Dict] = {}

    def ready() -> Optional[Job]:
        return next((j for j in todo if all(d in done for d in j.deps)), None)

    def finish(job: Job, result: Dict) -> None:
        done.add(job.key)
        results[job.key] = result
        _log(result.pop("summary", job.key))

    if workers <= 1:
        while (job := ready()) is not None:
            todo.remove(job)
            finish(job, runner(ctx, job.kind, *job.args))
        return results
    import multiprocessing as mp

    worker_ctx = replace(ctx, progress=False)  # two processes' bars would garble each other
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        running = {}
        while todo or running:
            while len(running) < workers and (job := ready()) is not None:
                todo.remove(job)
                running[pool.submit(runner, worker_ctx, job.kind, *job.args, threads=1)] = job
            if not running:
                raise RuntimeError(f"demo jobs wait on jobs that never ran: {[j.key for j in todo]}")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                finish(running.pop(future), future.result())
    return results


def _stage_costs(sources: Dict[str, Dict], grouters: Dict[str, List[Dict]]) -> Dict[str, Dict]:
    """Tokens and seconds of every stage, from the jobs' results."""
    cost: Dict[str, Dict] = {f"source_{w}": dict(tokens=r["tokens"], seconds=r["seconds"]) for w, r in sources.items()}
    for name, metas in grouters.items():
        for stage in ("distill", "tune", "predispatch"):
            cost[f"{stage}_{name}"] = dict(tokens=sum(m.get(f"{stage}_tokens", 0) for m in metas),
                                           seconds=sum(m[f"{stage}_seconds"] for m in metas))
    return cost


SEED_COUNTS = ("seeds", "control_seeds", "other_seeds", "bias_seeds")


def _check_config(ctx: Context, resume: bool) -> None:
    """Stages of another configuration are never mixed in: --resume refuses a folder made with other
    settings. Seed counts may change: every job is one seed's, so more seeds add jobs."""
    ctx.stages.mkdir(parents=True, exist_ok=True)
    path = ctx.stages / "config.json"
    mine = dict(config={k: v for k, v in ctx.cfg if k not in SEED_COUNTS}, corpus=ctx.corpus_path, device=ctx.device)
    if ctx.study:
        mine["study"] = True
    if resume and path.exists():
        theirs = json.loads(path.read_text())
        if theirs != mine:
            diff = sorted(k for k in mine["config"] if theirs.get("config", {}).get(k) != mine["config"][k])
            diff += [k for k in ("corpus", "device") if theirs.get(k) != mine[k]]
            raise ValueError(f"--resume: {ctx.out} was made with other settings ({', '.join(diff)}); "
                             "use another --out, or run without --resume")
        return
    path.write_text(json.dumps(mine))


def _throughput(ctx: Context, resume: bool) -> Dict:
    """learned_aux vs pre-dispatched grouter vs hash_balanced, steps interleaved, one thread (as a job)."""
    path = ctx.stages / "throughput.json"
    if resume and path.exists():
        return json.loads(path.read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        speed = run_job(ctx, "throughput")
    finally:
        torch.set_num_threads(threads)
    path.write_text(json.dumps(speed))
    t = speed["tokens_per_s"]
    _log("throughput, steps interleaved in one process: " + ", ".join(f"{n} {v:,.0f} tok/s" for n, v in t.items()))
    return speed


def router_settings(cfg: Config) -> Dict[str, Dict]:
    """The learned baselines' balancing terms as trained (the sources are learned_aux-style)."""
    from .lm import AUX_LOSS_COEF, Z_LOSS_COEF

    return dict(learned_aux=dict(aux_loss_coef=AUX_LOSS_COEF, aux_loss_coef_per_layer=AUX_LOSS_COEF / cfg.n_layers,
                                 z_loss_coef=Z_LOSS_COEF, z_loss_coef_per_layer=Z_LOSS_COEF / cfg.n_layers,
                                 note="coefficients on the mean over layers of each layer's term"),
                learned_bias=dict(bias_update_rate=1e-3, note="sign rule once per step (SigmoidTopKRouter default)"),
                lr=cfg.lr, lr_note="one learning rate for every run, chosen for none")


def _commit() -> str:
    """The grouter source's git commit (+ "-dirty" with uncommitted changes), or "unknown"."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "grouter"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def versions() -> Dict[str, str]:
    import numpy

    from .. import __version__

    v = dict(grouter=__version__, torch=torch.__version__, numpy=numpy.__version__, python=platform.python_version(),
             machine=platform.machine(), cpus=str(os.cpu_count()), commit=_commit(),
             # what the CPU numerics depend on beside the code: the same seed gives the same
             # numbers on the same commit, torch and instruction set
             numerics=f"torch {torch.__version__}, cpu {torch.backends.cpu.get_cpu_capability()}")
    for name in ("transformers", "tokenizers"):
        try:
            v[name] = __import__(name).__version__
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
        if seeds < 1:
            raise ValueError(f"--seeds must be at least 1, got {seeds}")
        cfg = replace(cfg, seeds=seeds)
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no GPU")
    if jobs is None:
        jobs = 2 if device == "cpu" and (os.cpu_count() or 1) >= 2 else 1
    out_path = Path(out)
    study = preset == "study" and not quick
    ctx = Context.make(out_path, cfg, corpus, device, progress, study=study)
    _check_config(ctx, resume)
    _log(f"writing to {out_path}; preset {'quick' if quick else preset}, seeds {cfg.seeds} "
         f"(controls {cfg.control_seeds}), device {device}, {jobs} job(s) at a time")

    t0 = time.perf_counter()
    data, desc = load_corpus(corpus)
    byte_corpus = Corpus(data, desc, max_bytes=cfg.corpus_bytes)
    tokens = build_token_corpus(byte_corpus, cfg.vocab_size, ctx.stages / "tokens", reuse=resume)
    tok_seconds = time.perf_counter() - t0
    tok_info = dict(tokens.summary(), seconds=tok_seconds)
    _log(f"corpus: {desc}, {byte_corpus.train_bytes.size / 1e6:.1f} MB train / {byte_corpus.val_bytes.size / 1e6:.2f} "
         f"MB validation; BPE {cfg.vocab_size}: {tok_info['train_tokens']:,} train tokens "
         f"({tok_info['bytes_per_token']:.2f} bytes/token), {tok_seconds:.0f} s")

    if study:
        return _run_study(ctx, jobs, resume, tok_info, desc, t_start)
    run_jobs(ctx, plan_jobs(ctx), jobs, resume)
    speed = _throughput(ctx, resume)

    runs = {name: [json.loads(run_file(ctx, name, s).read_text()) for s in range(cfg.seeds_of(name))]
            for name in cfg.runs}
    grouters = {name: [json.loads((ctx.stages / f"{name}_s{s}.json").read_text()) for s in range(cfg.seeds_of(name))]
                for name in GROUTER_RUNS if name in cfg.runs}
    sources = {w: torch.load(source_path(ctx, w), weights_only=False)["result"] for w in ("strong", "weak")}
    cost = dict(tokenizer=dict(tokens=0, seconds=tok_seconds), **_stage_costs(sources, grouters))
    for name, results in runs.items():
        cost[f"target_{name}"] = dict(tokens=sum(r["tokens"] for r in results),
                                      seconds=sum(r["seconds"] for r in results))
    report = write_report(out_path, cfg=asdict(cfg), runs=runs, sources=sources, grouters=grouters, cost=cost,
                          tokenizer=tok_info, throughput=speed, versions=versions(), paper=PAPER, corpus=desc, jobs=jobs,
                          wall_seconds=time.perf_counter() - t_start, hash_tables=hash_tables_summary(ctx),
                          router_settings=router_settings(cfg), preset="quick" if quick else preset)
    _log(f"done in {time.perf_counter() - t_start:.0f} s: {out_path / 'report.md'}")
    return report


def _run_study(ctx: Context, jobs: int, resume: bool, tok_info: Dict, corpus: str, t_start: float) -> Dict:
    """The study's jobs and report (study.py). Its wall time adds up over resumed invocations."""
    from .study import markdown, plan, prepare_domains, run_study_job, study_report

    domains = prepare_domains(ctx, resume)
    _log("domains: " + "; ".join(f"{d} {v['train_tokens']:,} train tokens" for d, v in domains.items()))
    walls_path = ctx.stages / "wall_seconds.json"
    walls = json.loads(walls_path.read_text()) if resume and walls_path.exists() else []
    try:
        run_jobs(ctx, plan(ctx, Job), jobs, resume, runner=run_study_job)
    finally:  # an invocation that fails still counts its time
        walls.append(time.perf_counter() - t_start)
        walls_path.write_text(json.dumps(walls))
    cfg = asdict(ctx.config)
    report = dict(study=study_report(ctx), config=cfg, preset="study", corpus=corpus, tokenizer=tok_info,
                  domains=domains, versions=versions(), jobs=jobs, wall_seconds=sum(walls), invocations=walls,
                  paper=PAPER, router_settings=router_settings(ctx.config))
    out = Path(ctx.out)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(markdown(report["study"], cfg))
    _log(f"done in {sum(walls):.0f} s over {len(walls)} invocation(s): {out / 'report.md'}")
    return report


__all__ = ["run_demo", "plan_jobs", "run_jobs", "Config", "PRESETS", "BASELINES", "grouter_dir"]
