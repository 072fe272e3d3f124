"""The demo's jobs: train a source, make a Grouter (distil, fold, tune, pre-dispatch), train a target.

Each job reads what earlier jobs left in `<out>/stages` and writes its own result there last, so a
killed demo resumes from the jobs it finished. Jobs run in worker processes (one thread each) or
in the calling process.
"""

from __future__ import annotations

import functools
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import CONTEXT_FREE, DOMAIN_GROUTERS, GROUTER_RUNS, ROUTERS, Config
from .corpus import Corpus, load_corpus
from .domains import DOMAINS
from .subwords import TokenCorpus, build_token_corpus, load_token_corpus

SOURCE_SEEDS = {"strong": 1000, "weak": 1001, "prose": 1100, "code": 1200}  # data order and weights of sources


def source_seed(which: str) -> int:
    """A source's seed: "strong", "weak", or the study's "<kind>_s<k>" (one independent source per seed)."""
    kind, _, k = which.partition("_s")
    return SOURCE_SEEDS[kind] + 10 * int(k or 0)


def source_domain(which: str) -> Optional[str]:
    """The domain a source trains on (None: the main corpus)."""
    kind = which.partition("_s")[0]
    return kind if kind in DOMAINS else None


@dataclass(frozen=True)
class Context:
    """What every job needs (picklable: it travels to the worker processes)."""

    out: str
    cfg: Tuple  # Config fields, as a tuple so the context hashes
    corpus_path: Optional[str]
    device: str
    progress: bool
    study: bool = False  # the study: every Grouter seed distilled from its own source

    @classmethod
    def make(cls, out, cfg: Config, corpus_path, device, progress, study: bool = False) -> "Context":
        return cls(str(out), tuple(asdict(cfg).items()), corpus_path, device, progress, study)

    @property
    def config(self) -> Config:
        return Config(**dict(self.cfg))

    @property
    def stages(self) -> Path:
        return Path(self.out) / "stages"


@functools.lru_cache(maxsize=6)
def token_corpus(ctx: Context, domain: Optional[str] = None) -> TokenCorpus:
    """The corpus (or one of the study's domains) as BPE tokens: built by the main process before
    any job runs, read back by the jobs."""
    cfg = ctx.config
    if domain is not None:
        return load_token_corpus(ctx.stages / f"tokens_{domain}")
    data, desc = load_corpus(ctx.corpus_path)
    return build_token_corpus(Corpus(data, desc, max_bytes=cfg.corpus_bytes), cfg.vocab_size, ctx.stages / "tokens")


def _schedule(step: int, steps: int, warmup: int) -> float:
    return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))


Routes = Tuple[Tensor, Tensor]


def new_model(cfg: Config, corpus: TokenCorpus, num_experts: int, seed: int, router: Optional[str], device: str,
              lr: Optional[float] = None):
    """A target-shaped MoE LM of `seed` (the same weights for every routing) and its optimizer
    (learning rate `lr`, default cfg.lr)."""
    from .lm import MoELM

    model = MoELM(cfg.d_model, cfg.n_layers, cfg.n_heads, num_experts, cfg.top_k, cfg.d_expert, seed, router,
                  vocab=corpus.vocab_size).to(device)
    return model, torch.optim.AdamW(model.parameters(), lr=cfg.lr if lr is None else lr, weight_decay=0.01)


def train_step(model, opt, x: Tensor, step: int, step_routes: Optional[Callable[[int, Tensor], Routes]],
               aux: bool = False) -> Tensor:
    """One optimizer step on the batch x: next-token loss (plus the routers' aux and z losses with `aux`)."""
    from ..nn import Routing, update_router_biases
    from .lm import AUX_LOSS_COEF, Z_LOSS_COEF

    routing = Routing.prepare(*step_routes(step, x), model.num_experts) if step_routes is not None else None
    logits = model(x, routing)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, model.vocab), x[:, 1:].reshape(-1))
    if aux:
        loss = loss + AUX_LOSS_COEF * model.aux_loss() + Z_LOSS_COEF * model.z_loss()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    update_router_biases(model)  # the sigmoid routers' load-balancing bias, once per step
    return loss


def train_lm(cfg: Config, corpus: TokenCorpus, name: str, seed: int, tokens: int, num_experts: int,
             router: Optional[str] = None, step_routes: Optional[Callable[[int, Tensor], Routes]] = None,
             val_routes: Optional[List[Routes]] = None, device: str = "cpu", progress: bool = True,
             lr: Optional[float] = None) -> Dict:
    """Train one MoE LM on `tokens` tokens (its own cosine schedule over them); returns its
    validation curve (nats per byte), throughput, routing balance (and the model).
    step_routes(step, x) gives a fixed routing's routes of a step."""
    from .lm import evaluate, routing_summary

    model, opt = new_model(cfg, corpus, num_experts, seed, router, device, lr)
    steps = max(1, tokens // cfg.tokens_per_step)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, steps, warmup))
    val = corpus.val_windows(cfg.val_windows, cfg.seq_len).to(device)
    nbytes = corpus.token_bytes.to(device)
    eval_at = {round(steps * (i + 1) / cfg.eval_points) for i in range(cfg.eval_points)}
    data = corpus.train_batches(seed, cfg.batch_size, cfg.seq_len)
    curve, seconds = [], 0.0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps * cfg.tokens_per_step, desc=f"{name} s{seed}", unit="tok", unit_scale=True, leave=False)
    for step in range(steps):
        t0 = time.perf_counter()
        loss = train_step(model, opt, next(data).to(device), step, step_routes, aux=router == "softmax")
        sched.step()
        seconds += time.perf_counter() - t0
        if bar is not None:
            bar.update(cfg.tokens_per_step)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if step + 1 in eval_at:
            curve.append([(step + 1) * cfg.tokens_per_step, evaluate(model, val, nbytes, routes=val_routes)])
    if bar is not None:
        bar.close()
    result = dict(name=name, seed=seed, val_curve=curve, final_val_loss=curve[-1][1],
                  tokens=steps * cfg.tokens_per_step, seconds=seconds,
                  tokens_per_s=steps * cfg.tokens_per_step / max(seconds, 1e-9), **routing_summary(model))
    return dict(result=result, model=model)


# -- sources ---------------------------------------------------------------------------------------

def source_path(ctx: Context, which: str) -> Path:
    return ctx.stages / f"source_{which}.pt"


def load_source(ctx: Context, which: str):
    from .lm import MoELM

    cfg, state = ctx.config, torch.load(source_path(ctx, which), weights_only=False)
    model = MoELM(cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.source_experts, cfg.top_k, cfg.d_expert,
                  source_seed(which), "softmax", vocab=cfg.vocab_size)
    model.load_state_dict(state["model"])
    return model.to(ctx.device).eval(), state["result"]


def make_source(ctx: Context, which: str) -> Dict:
    """A source MoE LM (learned softmax router + aux loss): "strong" on source_tokens, "weak" on a
    target run's budget; the study's prose and code sources on source_tokens of their domain."""
    cfg, corpus = ctx.config, token_corpus(ctx, source_domain(which))
    tokens = cfg.target_tokens if which == "weak" else cfg.source_tokens
    run = train_lm(cfg, corpus, f"source_{which}", source_seed(which), tokens, cfg.source_experts,
                   router="softmax", device=ctx.device, progress=ctx.progress)
    r = run["result"]
    torch.save(dict(result=r, model=run["model"].state_dict()), source_path(ctx, which))
    return dict(r, summary=f"source ({which}): {r['tokens']:,} tokens in {r['seconds']:.0f} s, "
                f"val {r['final_val_loss']:.4f} nats/byte, MaxVio {r['max_vio']:.2f}")


# -- Grouters --------------------------------------------------------------------------------------

def grouter_dir(ctx: Context, run: str, seed: int) -> Path:
    return ctx.stages / f"{run}_s{seed}"


@dataclass(frozen=True)
class GrouterSpec:
    """Where one seed's Grouter comes from and which data each stage reads (None: the main corpus)."""

    source: str  # a source name (source_path), or "random"
    causal: bool
    distill_on: Optional[str] = None  # distillation and the affinity
    tune_on: Optional[str] = None  # expert tuning, and the dev windows it selects on
    target_on: Optional[str] = None  # the target runs it routes: pre-dispatch and the reported figures


def grouter_spec(ctx: Context, run: str, seed: int) -> GrouterSpec:
    if run in DOMAIN_GROUTERS:
        kind, tune_on = DOMAIN_GROUTERS[run]
        return GrouterSpec(f"{kind}_s{seed}", True, kind, tune_on, "code")
    which, causal = GROUTER_RUNS[run]
    if ctx.study and which == "strong":
        which = f"strong_s{seed}"
    return GrouterSpec(which, causal)


def make_grouter(ctx: Context, run: str, seed: int) -> Dict:
    """The Grouter of one seed of a Grouter run: distilled from its source (or left random), folded
    to the target's experts by affinity, tuned, and the seed's training routes pre-dispatched."""
    from ..nn import fold_groups
    from ..router import (Grouter, affinity, distill, fold, heldout_metrics, predispatch, routed_max_vio,
                          teacher_logits, tune)

    cfg, spec = ctx.config, grouter_spec(ctx, run, seed)
    which, causal = spec.source, spec.causal
    corpus, tune_corpus = token_corpus(ctx, spec.distill_on), token_corpus(ctx, spec.tune_on)
    target = token_corpus(ctx, spec.target_on)
    S, B = cfg.seq_len, cfg.batch_size
    batches = [next(corpus.train_batches(10_000 + 100 * seed + i, B, S)) for i in range(cfg.distill_batches)]
    tune_batches = [next(tune_corpus.train_batches(20_000 + 100 * seed + i, B, S)) for i in range(cfg.tune_batches)]
    held = target.val_windows(cfg.heldout_windows, S).to(ctx.device)  # read only to report
    held_batches = list(held.split(B))
    dev_batches = list(tune_corpus.dev_windows(cfg.dev_windows, S).to(ctx.device).split(B))  # tuning selects on these
    torch.manual_seed(5000 + seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the bidirectional warning: that leak is what the audit measures
        g = Grouter(cfg.vocab_size, cfg.source_experts, cfg.top_k, d_model=cfg.grouter_d_model,
                    n_layers=0 if run in CONTEXT_FREE else cfg.grouter_layers, n_heads=cfg.grouter_heads,
                    causal=causal, source=f"demo {which} source MoE, layer 0").to(ctx.device)
    meta: Dict = dict(run=run, seed=seed, source=which, causal=causal, distilled_on=spec.distill_on or "main",
                      tuned_on=spec.tune_on or "main", routes=spec.target_on or "main")
    t0 = time.perf_counter()
    if which != "random":
        source, _ = load_source(ctx, which)
        held_teacher = teacher_logits(source, held, progress=False)
        before = heldout_metrics(g, held_teacher)
        distill(g, source, batches, steps=cfg.distill_steps, progress=ctx.progress)
        after = heldout_metrics(g, held_teacher)
        meta.update(kl_before=before["kl"], kl_after=after["kl"], topk_agreement_before=before["topk_agreement"],
                    topk_agreement=after["topk_agreement"], distill_tokens=cfg.distill_steps * cfg.tokens_per_step)
    meta["distill_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    A = affinity(g, batches)
    groups = fold_groups(A, cfg.target_experts)
    folded = fold(g, groups)
    vio_folded = routed_max_vio(folded, held_batches)  # validation: reported, never selected on
    tuned = tune(folded, tune_batches, steps=cfg.tune_steps, heldout=dev_batches, progress=ctx.progress)
    meta.update(tune_seconds=time.perf_counter() - t0, tune_tokens=cfg.tune_steps * cfg.tokens_per_step,
                affinity=A.tolist(), groups=groups.tolist(), max_vio_folded=vio_folded,
                max_vio_tuned=routed_max_vio(folded, held_batches), tune_best_step=tuned["best_step"],
                tune_dev_max_vio=dict(before=tuned["max_vio_before"], after=tuned["max_vio_after"]))
    folder = grouter_dir(ctx, run, seed)
    folded.save(folder)
    meta["parameters"] = sum(p.numel() for p in folded.parameters())
    if run in CONTEXT_FREE:  # the target trains on the exported table's lookups
        meta.update(_export_table(folded.eval(), folder, vocab=cfg.vocab_size))
        meta["predispatch_seconds"], meta["predispatch_tokens"] = 0.0, 0
        (ctx.stages / f"{run}_s{seed}.json").write_text(json.dumps(meta))
        return dict(meta, summary=f"{run} s{seed}: held-out KL {meta['kl_before']:.3f} -> {meta['kl_after']:.3f}, "
                    f"top-{cfg.top_k} agreement {meta['topk_agreement']:.3f}; table {cfg.vocab_size} x {cfg.top_k} "
                    f"exported; validation MaxVio {meta['max_vio_folded']:.2f} -> {meta['max_vio_tuned']:.2f}")
    # The target run of this seed reads these routes instead of running the Grouter every step.
    t0 = time.perf_counter()
    data = target.train_batches(seed, B, S)
    samples = torch.cat([next(data) for _ in range(cfg.target_steps)])
    predispatch(folded.eval(), samples, folder / "routes", batch_size=4 * B, progress=ctx.progress)
    meta["predispatch_seconds"] = time.perf_counter() - t0
    meta["predispatch_tokens"] = samples.numel()
    (ctx.stages / f"{run}_s{seed}.json").write_text(json.dumps(meta))
    kl = (f"held-out KL {meta['kl_before']:.3f} -> {meta['kl_after']:.3f}, top-{cfg.top_k} agreement "
          f"{meta['topk_agreement']:.3f}; " if "kl_after" in meta else "")
    return dict(meta, summary=f"{run} s{seed}: {kl}fold {cfg.source_experts} -> {cfg.target_experts}; held-out "
                f"MaxVio {meta['max_vio_folded']:.2f} -> {meta['max_vio_tuned']:.2f}")


def _export_table(g, folder: Path, vocab: int) -> Dict:
    """Write g's token id -> experts table (g reads no context, so the table is its routing) and
    check the file routes every id as g does."""
    from ..router import TableRouter

    ids = torch.arange(vocab, device=next(g.parameters()).device).view(-1, 1)
    table = TableRouter.from_routes(g, [ids.view(1, -1)], source=f"{folder.name}: a Grouter without blocks")
    path = table.save(folder / "table.safetensors")
    again = TableRouter.load(path)
    with torch.no_grad():
        g_ids, g_w = g.route(ids.view(1, -1))
    t_ids, t_w = again.route(ids.view(1, -1).cpu())
    same = (g_ids.cpu().sort(-1).values == t_ids.sort(-1).values).all(-1).float().mean().item()
    return dict(table=str(path.name), table_checksum=again.checksum(), table_same_routes=same,
                table_max_weight_diff=float((g_w.cpu().sort(-1).values - t_w.sort(-1).values).abs().max()))


# -- target runs -----------------------------------------------------------------------------------

def _predispatched(reader, batch: int) -> Callable[[int, Tensor], Routes]:
    def step_routes(step: int, x: Tensor) -> Routes:
        tokens, ids, w = reader[step * batch:(step + 1) * batch]
        if not torch.equal(tokens.to(x.device), x):
            raise RuntimeError(f"pre-dispatched routes of step {step} belong to other tokens")
        return ids.reshape(-1, ids.shape[-1]).to(x.device), w.reshape(-1, w.shape[-1]).to(x.device)

    return step_routes


def routing_of(ctx: Context, name: str, seed: int, domain: Optional[str] = None):
    """(step_routes, route, Grouter) of a target run; all None for a learned router. A Grouter run's
    training routes are read from its pre-dispatch folder; `route` routes any batch (validation)."""
    from ..router import Grouter, PredispatchReader
    from .lm import balanced_hash_table, grouter_router, hash_table, table_router

    cfg, corpus = ctx.config, token_corpus(ctx, domain)
    E, K = cfg.target_experts, cfg.top_k
    if name == "hash":
        route = table_router(hash_table(E, K, vocab=corpus.vocab_size))
    elif name == "hash_balanced":
        route = table_router(balanced_hash_table(corpus.frequencies(), E, K))
    elif name in CONTEXT_FREE:
        from ..router import TableRouter

        table = TableRouter.load(grouter_dir(ctx, name, seed) / "table.safetensors", map_location=ctx.device)
        route = _table_route(table)
    elif name in GROUTER_RUNS or name in DOMAIN_GROUTERS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            g = Grouter.load(grouter_dir(ctx, name, seed), map_location=ctx.device).eval()
        reader = PredispatchReader(grouter_dir(ctx, name, seed) / "routes", g)
        return _predispatched(reader, cfg.batch_size), grouter_router(g), g
    else:
        return None, None, None
    return (lambda step, x: route(x)), route, None


def hash_tables_summary(ctx: Context) -> Dict[str, Dict]:
    """The hash baselines' tables on the training split: load balance (max / mean expert load,
    tokens weighted by frequency) and how many distinct expert sets the ids use."""
    from .lm import balanced_hash_table, hash_table

    cfg, corpus = ctx.config, token_corpus(ctx)
    E, K, freq = cfg.target_experts, cfg.top_k, corpus.frequencies().double()
    out = {}
    for name, table in (("hash", hash_table(E, K, vocab=corpus.vocab_size)),
                        ("hash_balanced", balanced_hash_table(corpus.frequencies(), E, K))):
        load = torch.zeros(E, dtype=torch.float64).index_add_(0, table.reshape(-1), freq.repeat_interleave(K))
        out[name] = dict(max_over_mean_load=float(load.max() / load.mean()),
                         distinct_sets=len({tuple(sorted(r)) for r in table.tolist()}),
                         possible_sets=min(math.comb(E, K), corpus.vocab_size), measured_on="training split")
    return out


def _table_route(table):
    def route(input_ids: Tensor) -> Routes:
        ids, w = table.route(input_ids)
        return ids.reshape(-1, table.top_k), w.reshape(-1, table.top_k)

    return route


def run_file(ctx: Context, name: str, seed: int, multiple: int = 1, lr: Optional[float] = None,
             domain: Optional[str] = None) -> Path:
    tag = (f"_{domain}" if domain else "") + (f"_x{multiple}" if multiple != 1 else "") + \
        (f"_lr{lr:g}" if lr is not None else "")
    return ctx.stages / f"run_{name}{tag}_s{seed}.json"


def run_target(ctx: Context, name: str, seed: int, multiple: int = 1, lr: Optional[float] = None,
               domain: Optional[str] = None) -> Dict:
    """One target run: the seed's model, data order and budget (`multiple` x target_tokens, its own
    cosine schedule), routed as `name` says, at learning rate `lr` (None: cfg.lr), on the main
    corpus or a study domain. Its final loss is read on validation (reported) and dev (what a
    selection may read)."""
    from .lm import EVAL_BATCH, evaluate, leak_free_routes

    cfg, corpus, device = ctx.config, token_corpus(ctx, domain), ctx.device
    val = corpus.val_windows(cfg.val_windows, cfg.seq_len).to(device)
    dev = corpus.dev_windows(cfg.dev_windows, cfg.seq_len).to(device)
    step_routes, route, g = routing_of(ctx, name, seed, domain)

    @torch.no_grad()
    def routes_of(windows: Tensor) -> Optional[List[Routes]]:  # per batch, as evaluate() batches them
        return [route(x) for x in windows.split(EVAL_BATCH)] if route is not None else None

    val_routes, dev_routes = routes_of(val), routes_of(dev)
    run = train_lm(cfg, corpus, name, seed, cfg.target_tokens * multiple, cfg.target_experts, router=ROUTERS.get(name),
                   step_routes=step_routes, val_routes=val_routes, device=device, progress=ctx.progress, lr=lr)
    result = run["result"]
    result.update(multiple=multiple, lr=cfg.lr if lr is None else lr, domain=domain or "main",
                  final_dev_loss=evaluate(run["model"], dev, corpus.token_bytes, routes=dev_routes))
    if g is not None:  # the leak audit: routes an autoregressive model could compute
        # On every `audit_every`-th validation window: a bidirectional Grouter reroutes each prefix
        # (S passes per window), the cost that keeps the audit to a subset. Own routes are scored
        # on the same windows, so the difference is the routes' alone.
        audit = val[::cfg.audit_every]
        prefix = [leak_free_routes(g, x) for x in audit.split(EVAL_BATCH)]
        result.update(audit_windows=int(audit.shape[0]),
                      audit_own_val_loss=evaluate(run["model"], audit, corpus.token_bytes, routes=routes_of(audit)),
                      audit_prefix_only_val_loss=evaluate(run["model"], audit, corpus.token_bytes, routes=prefix))
    run_file(ctx, name, seed, multiple, lr, domain).write_text(json.dumps(result))
    extra = (f", on {result['audit_windows']} windows prefix-only routes {result['audit_prefix_only_val_loss']:.4f} "
             f"vs own {result['audit_own_val_loss']:.4f}" if g is not None else "")
    return dict(result, summary=f"{name} s{seed}: val {result['final_val_loss']:.4f} nats/byte{extra}, "
                f"{result['tokens_per_s']:,.0f} tok/s, MaxVio {result['max_vio']:.2f}")


def throughput(ctx: Context, names=("learned_aux", "grouter", "hash_balanced"), steps: int = 12,
               warmup: int = 2) -> Dict:
    """Training tokens/s of a few routings measured side by side in one process: steps interleaved
    (seed 0's model, data and routes), median step time. The target runs' own tokens/s depend on
    what the other job ran beside them."""
    import statistics

    cfg, corpus = ctx.config, token_corpus(ctx)
    setups = {n: (new_model(cfg, corpus, cfg.target_experts, 0, ROUTERS.get(n), ctx.device), routing_of(ctx, n, 0)[0])
              for n in names}
    data = corpus.train_batches(0, cfg.batch_size, cfg.seq_len)
    times: Dict[str, List[float]] = {n: [] for n in names}
    for step in range(warmup + steps):
        x = next(data).to(ctx.device)
        for n, ((model, opt), step_routes) in setups.items():
            t0 = time.perf_counter()
            train_step(model, opt, x, step, step_routes, aux=ROUTERS.get(n) == "softmax")
            times[n].append(time.perf_counter() - t0)
    out = {n: cfg.tokens_per_step / statistics.median(t[warmup:]) for n, t in times.items()}
    return dict(tokens_per_s=out, steps=steps, threads=torch.get_num_threads(),
                method="steps interleaved in one process, median step time, seed 0")


KINDS = {"source": make_source, "grouter": make_grouter, "run": run_target, "throughput": throughput}


def run_job(ctx: Context, kind: str, *args, threads: Optional[int] = None) -> Dict:
    """Run one job (in a worker: threads=1, so two jobs share two cores without oversubscribing)."""
    if threads is not None:
        torch.set_num_threads(threads)
    return KINDS[kind](ctx, *args)
