"""`grouter demo --preset study`: the decisive experiment (about an hour on 2 cores, resumable).

  - baselines hash, hash_balanced and learned_aux at 1x, 2x and 4x a Grouter run's tokens, each
    budget with its own cosine schedule, each baseline at the learning rate its seed-0 1x run
    reaches the lowest dev loss with (of LR_GRID);
  - 3 seeds everywhere; each Grouter seed distilled from its own strong source (trained from its
    own seed), so source variance lies inside the interval; grouter_table from the same sources;
  - data utilisation measured: per seed, the budget multiple at which a baseline reaches the
    Grouter's 1x validation loss (besides the paper's measure, read off the Grouter's curve);
  - the Grouter's parameters and forward FLOPs per token beside the target's, and total tokens;
  - domain shift (domains.py): targets trained on code, routed by Grouters from prose sources
    (as made, and tuned on code) and from code sources, against the best baseline (chosen on dev).

Every selection reads dev (carved from training data); validation is read only to report.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from .config import DOMAIN_GROUTERS, Config
from .jobs import Context, grouter_spec, run_file, run_job, source_path, token_corpus
from .report import summarize
from .stats import by_seed, comparison, data_utilization, mean_ci, tokens_to_reach

LR_GRID = (1.5e-3, 3e-3, 6e-3)
MULTIPLES = (1, 2, 4)
BASELINES = ("hash", "hash_balanced", "learned_aux")
GROUTERS = ("grouter", "grouter_table")
BEST = "best_baseline"  # on code: the baseline (and its learning rate) with the lowest dev loss


def _sweep_key(name: str, lr: float) -> str:
    return f"run:{name}:0:1:{lr}:None"


def chosen_path(ctx: Context, name: str, seed: int, multiple: int, domain: Optional[str]) -> Path:
    return ctx.stages / f"chosen_{name}{'_' + domain if domain else ''}_x{multiple}_s{seed}.json"


def plan(ctx: Context, job) -> List:
    """The study's jobs, in the order they start when ready: sources (the longest chains) first,
    then Grouters and their runs, then the baselines' sweep and their budgets, longest first."""
    cfg, seeds = ctx.config, range(ctx.config.seeds)
    sources = [job("source", (f"{kind}_s{k}",), (), source_path(ctx, f"{kind}_s{k}"))
               for kind in ("strong", "code", "prose") for k in seeds]
    grouters, runs = [], []
    for name in GROUTERS + tuple(DOMAIN_GROUTERS):
        domain = "code" if name in DOMAIN_GROUTERS else None
        for k in seeds:
            spec = grouter_spec(ctx, name, k)
            grouters.append(job("grouter", (name, k), (f"source:{spec.source}",), ctx.stages / f"{name}_s{k}.json"))
            runs.append(job("run", (name, k, 1, None, domain), (f"grouter:{name}:{k}",),
                            run_file(ctx, name, k, 1, None, domain)))
    sweep = [job("run", (b, 0, 1, lr, None), (), run_file(ctx, b, 0, 1, lr)) for b in BASELINES for lr in LR_GRID]
    chosen = [job("chosen", (b, k, m, None), tuple(_sweep_key(b, lr) for lr in LR_GRID),
                  chosen_path(ctx, b, k, m, None))
              for m in sorted(MULTIPLES, reverse=True) for b in BASELINES for k in seeds]
    every_sweep = tuple(_sweep_key(b, lr) for b in BASELINES for lr in LR_GRID)
    chosen += [job("chosen", (BEST, k, 1, "code"), every_sweep, chosen_path(ctx, BEST, k, 1, "code")) for k in seeds]
    return sources + grouters + runs + sweep + chosen


def lr_selection(ctx: Context, baselines: Tuple[str, ...] = BASELINES) -> Dict:
    """Each baseline's learning rate: the lowest final dev loss of its seed-0 1x runs; and the best
    of `baselines` at its own rate (what the domain study compares with). Reads only those
    baselines' sweep runs (a job depends on no other)."""
    out = {}
    for b in baselines:
        dev = {lr: json.loads(run_file(ctx, b, 0, 1, lr).read_text())["final_dev_loss"] for lr in LR_GRID}
        best = min(LR_GRID, key=lambda lr: dev[lr])
        out[b] = dict(dev_loss={f"{lr:g}": v for lr, v in dev.items()}, lr=best, dev_loss_at_lr=dev[best])
    best = min(baselines, key=lambda b: out[b]["dev_loss_at_lr"])
    return dict(per_baseline=out, best_baseline=best, split="dev", grid=list(LR_GRID),
                how="seed 0, 1x budget: the rate with the lowest final dev loss")


def run_chosen(ctx: Context, name: str, seed: int, multiple: int, domain: Optional[str]) -> Dict:
    """A baseline's run at its chosen learning rate (the sweep's own run where it is one)."""
    sel = lr_selection(ctx, BASELINES if name == BEST else (name,))
    base = sel["best_baseline"] if name == BEST else name
    lr = sel["per_baseline"][base]["lr"]
    done = run_file(ctx, base, seed, multiple, lr, domain)
    result = json.loads(done.read_text()) if done.exists() else run_job(ctx, "run", base, seed, multiple, lr, domain)
    result = {k: v for k, v in result.items() if k != "summary"}
    result.update(chosen_as=name, baseline=base)
    chosen_path(ctx, name, seed, multiple, domain).write_text(json.dumps(result))
    return dict(result, summary=f"{name} ({base}, lr {lr:g}) x{multiple}{' on ' + domain if domain else ''} "
                f"s{seed}: val {result['final_val_loss']:.4f} nats/byte")


def run_study_job(ctx: Context, kind: str, *args, threads: Optional[int] = None) -> Dict:
    if kind == "chosen":
        if threads is not None:
            torch.set_num_threads(threads)
        return run_chosen(ctx, *args)
    return run_job(ctx, kind, *args, threads=threads)


def prepare_domains(ctx: Context, resume: bool) -> Dict[str, Dict]:
    """Cut the prose and code domains from the standard library and encode them with the main BPE."""
    import pydoc_data.topics

    from .corpus import Corpus, _stdlib_files
    from .domains import DOMAINS, domain_bytes
    from .subwords import build_token_corpus

    cfg, out = ctx.config, {}
    done = all((ctx.stages / f"tokens_{d}" / "tokens.json").exists() for d in DOMAINS)
    if not (resume and done):
        texts = domain_bytes(_stdlib_files(), pydoc_data.topics.topics)
        for d in DOMAINS:
            build_token_corpus(Corpus(texts[d], f"stdlib {d}"), cfg.vocab_size, ctx.stages / f"tokens_{d}",
                               reuse=False, tokenizer=ctx.stages / "tokens" / "tokenizer.json")
    for d in DOMAINS:
        out[d] = token_corpus(ctx, d).summary()
    return out


# -- the study's report ------------------------------------------------------------------------------

def _load(path: Path) -> Dict:
    return json.loads(path.read_text())


def reach_multiple(losses: Dict[int, float], target: float) -> Tuple[Optional[float], Optional[int]]:
    """(interpolated, smallest measured) budget multiple at which a baseline's final loss reaches
    `target`: losses {multiple: loss}, interpolated linearly in log2(multiple) between the measured
    budgets. (None, None) when the largest budget does not reach it; at 1x already: (1.0, 1) (a
    bound: less may do)."""
    ms = sorted(losses)
    at = tokens_to_reach([[math.log2(m), losses[m]] for m in ms], target)  # a curve over log2 budgets
    if at is None:
        return None, None
    return 2 ** at, next(m for m in ms if losses[m] <= target)


def measured_utilisation(grouter: Dict[int, float], baseline: Dict[int, Dict[int, float]]) -> Dict:
    """Per seed: the multiple of a Grouter run's tokens the baseline needs to reach that seed's
    Grouter loss at 1x; mean and 95% interval when every seed reaches it within the largest budget."""
    per_seed = {}
    for s, g in grouter.items():
        value, smallest = reach_multiple({m: baseline[m][s] for m in baseline}, g)
        per_seed[str(s)] = dict(interpolated=value, smallest_measured=smallest)
    values = [v["interpolated"] for v in per_seed.values()]
    out = dict(per_seed=per_seed, multiples=sorted(baseline))
    if all(v is not None for v in values):
        out.update(mean_ci([math.log2(v) for v in values]))
        out["mean"], out["ci95"] = 2 ** out["mean"], [2 ** c for c in out["ci95"]] if out["ci95"] else None
        out["note"] = "geometric mean over seeds, interval from log2 multiples"
    else:
        out.update(mean=None, ci95=None, note=f"{sum(v is None for v in values)} seed(s) not reached within "
                   f"{max(baseline)}x: more than {max(baseline)}x")
    return out


def forward_flops_per_token(model: torch.nn.Module, seq_len: int, causal: bool = True) -> Dict:
    """Forward FLOPs per token: 2 per weight a token meets (dense linears; of an MoE's experts the
    top_k / num_experts it is routed to) plus attention's scores and values (4 x context x width
    per layer; context (S + 1) / 2 when causal)."""
    from ..nn import MoE
    from ..nn.attention import Attention

    dense = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    expert = sum(sum(p.numel() for p in m.experts.parameters()) * m.top_k / m.num_experts
                 for m in model.modules() if isinstance(m, MoE))
    context = (seq_len + 1) / 2 if causal else seq_len
    attn = sum(4 * context * m.qkv.in_features for m in model.modules() if isinstance(m, Attention))
    return dict(flops=2 * (dense + expert) + attn, dense_weights=dense, active_expert_weights=expert)


def costs(ctx: Context, grouter_runs: List[Dict]) -> Dict:
    from ..router import Grouter
    from .lm import MoELM

    cfg = ctx.config
    target = MoELM(cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.target_experts, cfg.top_k, cfg.d_expert, 0, None,
                   vocab=cfg.vocab_size)
    g = Grouter.load(ctx.stages / "grouter_s0")
    tf, gf = forward_flops_per_token(target, cfg.seq_len), forward_flops_per_token(g, cfg.seq_len, g.causal)
    tp, gp = sum(p.numel() for p in target.parameters()), sum(p.numel() for p in g.parameters())
    srcs = [torch.load(source_path(ctx, f"strong_s{k}"), weights_only=False)["result"] for k in range(cfg.seeds)]
    source_tokens = srcs[0]["tokens"]
    per_run = dict(target=cfg.target_steps * cfg.tokens_per_step, distill=grouter_runs[0]["distill_tokens"],
                   tune=grouter_runs[0]["tune_tokens"], source=source_tokens)
    return dict(
        parameters=dict(target=tp, grouter=gp, grouter_over_target=gp / tp,
                        target_active=int(tp - sum(p.numel() for n, p in target.named_parameters() if ".experts." in n)
                                          * (1 - cfg.top_k / cfg.target_experts))),
        forward_flops_per_token=dict(target=tf["flops"], grouter=gf["flops"], grouter_over_target=gf["flops"] / tf["flops"],
                                     grouter_over_target_training=gf["flops"] / (3 * tf["flops"]),
                                     note="the Grouter runs forward once per training token (pre-dispatch); a "
                                          "target training step is about 3x its forward"),
        tokens=dict(per_grouter_run=per_run, grouter_run_total=sum(per_run.values()),
                    grouter_run_total_over_target=sum(per_run.values()) / per_run["target"],
                    note="one source per Grouter seed here: its tokens count in full against each run; a source "
                         "shared by n runs costs each 1/n"),
        source_val_loss_per_seed=[s["final_val_loss"] for s in srcs])


def _summary(results: List[Dict]) -> Dict:
    finals = [r["final_val_loss"] for r in results]
    m = mean_ci(finals)
    return dict(mean=m["mean"], ci95=m["ci95"], per_seed=finals, seeds=[r["seed"] for r in results])


def study_report(ctx: Context) -> Dict:
    cfg = ctx.config
    seeds = range(cfg.seeds)
    sel = lr_selection(ctx)
    runs = {n: [_load(run_file(ctx, n, k)) for k in seeds] for n in GROUTERS}
    base = {b: {m: [_load(chosen_path(ctx, b, k, m, None)) for k in seeds] for m in MULTIPLES} for b in BASELINES}
    g1 = by_seed(runs["grouter"])
    table = {n: {"1": _summary(rs)} for n, rs in runs.items()}
    table.update({b: {str(m): _summary(base[b][m]) for m in MULTIPLES} for b in BASELINES})
    V = "validation"
    vs = [comparison(g1, by_seed(base[b][m]), "grouter (1x)", f"{b} ({m}x)", split=V)
          for b in BASELINES for m in MULTIPLES]
    vs.append(comparison(g1, by_seed(runs["grouter_table"]), "grouter", "grouter_table", split=V))
    measured = {b: measured_utilisation(g1, {m: by_seed(base[b][m]) for m in MULTIPLES}) for b in BASELINES}
    paper = {b: {str(m): data_utilization(summarize(runs["grouter"]), f"{b} ({m}x)", summarize(base[b][m]))
                 for m in MULTIPLES} for b in BASELINES}
    grouter_meta = [_load(ctx.stages / f"grouter_s{k}.json") for k in seeds]
    domain = {n: [_load(run_file(ctx, n, k, 1, None, "code")) for k in seeds] for n in DOMAIN_GROUTERS}
    domain[BEST] = [_load(chosen_path(ctx, BEST, k, 1, "code")) for k in seeds]
    d = {n: by_seed(rs) for n, rs in domain.items()}
    pairs = [(n, BEST) for n in DOMAIN_GROUTERS] + [("grouter_prose", "grouter_code"),
                                                      ("grouter_prose_tuned", "grouter_code"),
                                                      ("grouter_prose_tuned", "grouter_prose")]
    best_name = f"{BEST} ({domain[BEST][0]['baseline']})"
    shift = [comparison(d[a], d[b], a, best_name if b == BEST else b, split=V) for a, b in pairs]
    domain_meta = {n: [_load(ctx.stages / f"{n}_s{k}.json") for k in seeds] for n in DOMAIN_GROUTERS}
    return dict(
        lr_selection=sel, table=table, comparisons=vs, measured_utilisation=measured,
        paper_utilisation=paper, costs=costs(ctx, grouter_meta),
        source_variance=dict(grouter_per_seed=[g1[k] for k in seeds],
                             grouter_table_per_seed=_summary(runs["grouter_table"])["per_seed"],
                             sources=[f"strong_s{k}" for k in seeds]),
        domain_shift=dict(table={n: _summary(rs) for n, rs in domain.items()}, comparisons=shift,
                          best_baseline=domain[BEST][0]["baseline"], lr=domain[BEST][0]["lr"],
                          tuning_max_vio={n: dict(before=statistics.fmean(m["max_vio_folded"] for m in ms),
                                                  after=statistics.fmean(m["max_vio_tuned"] for m in ms),
                                                  split="code validation")
                                          for n, ms in domain_meta.items()},
                          topk_agreement_with_source_on_code={n: statistics.fmean(m["topk_agreement"] for m in ms)
                                                              for n, ms in domain_meta.items()}),
        grouter_lr=cfg.lr, grouter_lr_note="the default rate, not selected for the Grouter runs",
        multiples=list(MULTIPLES), seeds=list(seeds))


def _fmt_ci(ci, signed: bool = False) -> str:
    if not ci:
        return "n/a"
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if signed else f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def _holds(c: Dict) -> str:
    ci = c["ci95"]
    if ci is None:
        return "no interval"
    return "lower" if ci[1] < 0 else "higher" if ci[0] > 0 else "cannot tell"


def answers(s: Dict) -> List[str]:
    """The study's questions, answered from its numbers (intervals: 95%, paired over 3 seeds)."""
    comp = {(c["a"], c["b"]): c for c in s["comparisons"]}
    out = []
    # half the data?
    parts = []
    for b, u in s["measured_utilisation"].items():
        at_1x = sum(v["smallest_measured"] == 1 for v in u["per_seed"].values())
        if u["mean"] is not None:
            parts.append(f"`{b}` needs {u['mean']:.2f}x the tokens" + (
                f" [{u['ci95'][0]:.2f}, {u['ci95'][1]:.2f}]" if u["ci95"] else "")
                + (f" (at most: {at_1x} seed(s) reach it at 1x already, the smallest budget run)" if at_1x else ""))
        else:
            parts.append(f"`{b}` does not reach it within {max(u['multiples'])}x ({u['note']})")
    same = "; ".join(f"`{b}` {c['mean_diff']:+.4f} {_fmt_ci(c['ci95'], True)}"
                     for b in BASELINES for c in [comp[("grouter (1x)", f"{b} (1x)")]])
    out.append(f"**Half the data?** At equal tokens, grouter − baseline: {same}. To reach the Grouter's 1x "
               "validation loss (per seed, measured on budgets "
               f"{', '.join(f'{m}x' for m in s['multiples'])} with their own schedules): " + "; ".join(parts) + ".")
    # source variance
    sv = s["source_variance"]
    g = sv["grouter_per_seed"]
    out.append(f"**Source variance?** Each Grouter seed from its own strong source (source losses "
               f"{', '.join(f'{v:.4f}' for v in s['costs']['source_val_loss_per_seed'])}): grouter's finals "
               f"{', '.join(f'{v:.4f}' for v in g)} (spread {max(g) - min(g):.4f} nats/byte); every interval here includes "
               "it.")
    c = comp[("grouter", "grouter_table")]
    out.append(f"**Context or clustering?** grouter − grouter_table (a token id → experts table from the same "
               f"sources, folded and tuned alike): {c['mean_diff']:+.4f} {_fmt_ci(c['ci95'], True)}: "
               + {"lower": "context helps beyond the table.", "higher": "the table is better: the gain is the "
                  "token-id clustering, not context.", "cannot tell": "no difference this study can see: what the "
                  "Grouter gives, a token-id table gives as well.", "no interval": ""}[_holds(c)])
    ds = s["domain_shift"]
    dc = {c["a"]: c for c in ds["comparisons"] if c["b"].startswith(BEST)}
    words = {"lower": "better than", "higher": "worse than", "cannot tell": "level with", "no interval": "vs"}
    out.append("**Domain shift?** Targets trained on code, against the best baseline on dev "
               f"(`{ds['best_baseline']}`, lr {ds['lr']:g}): " + "; ".join(
                   f"`{n}` {c['mean_diff']:+.4f} {_fmt_ci(c['ci95'], True)} ({words[_holds(c)]})"
                   for n, c in dc.items()) + ".")
    return out


def markdown(s: Dict, cfg: Dict) -> str:
    lines = ["# grouter demo --preset study", "",
             f"d={cfg['d_model']}, {cfg['n_layers']} layers, {cfg['source_experts']} -> {cfg['target_experts']} experts "
             f"top-{cfg['top_k']}; 1x = {cfg['target_tokens']:,} tokens (a Grouter run's budget), each baseline "
             f"budget with its own cosine schedule; strong sources {cfg['source_tokens']:,} tokens each, one per seed. "
             f"Validation loss in nats per byte, 95% t-intervals over {len(s['seeds'])} seeds. "
             f"Selections read dev only.", "", "## Answers", ""]
    lines += [f"- {a}" for a in answers(s)]
    lines += ["", "## Learning rates (chosen on dev: seed 0, 1x)", "",
              "| baseline | " + " | ".join(f"dev @ {lr:g}" for lr in s["lr_selection"]["grid"]) + " | chosen |",
              "|---|" + "---|" * (len(s["lr_selection"]["grid"]) + 1)]
    for b, v in s["lr_selection"]["per_baseline"].items():
        lines.append(f"| {b} | " + " | ".join(f"{x:.4f}" for x in v["dev_loss"].values()) + f" | {v['lr']:g} |")
    lines += ["", f"Grouter runs: lr {s['grouter_lr']:g}, the default, not selected for them.", "",
              "## Final validation loss by budget", "",
              "| run | " + " | ".join(f"{m}x" for m in s["multiples"]) + " |", "|---|" + "---|" * len(s["multiples"])]
    for n, row in s["table"].items():
        lines.append(f"| {n} | " + " | ".join(
            f"{row[str(m)]['mean']:.4f} {_fmt_ci(row[str(m)]['ci95'])}" if str(m) in row else ""
            for m in s["multiples"]) + " |")
    lines += ["", "## Paired differences (same seeds)", "", "| a − b | mean | 95% CI | a is |", "|---|---|---|---|"]
    for c in s["comparisons"]:
        lines.append(f"| {c['a']} − {c['b']} | {c['mean_diff']:+.4f} | {_fmt_ci(c['ci95'], True)} | {_holds(c)} |")
    lines += ["", "## Data utilisation", "", "Measured: the budget multiple at which each baseline reaches the "
              "Grouter's 1x loss, per seed (interpolated in log2 between measured budgets; the smallest measured "
              "budget that reaches it in brackets).", ""]
    for b, u in s["measured_utilisation"].items():
        per = ", ".join(f"s{k}: " + (f"{v['interpolated']:.2f}x ({v['smallest_measured']}x)" if v["interpolated"]
                                     else f"> {max(u['multiples'])}x") for k, v in u["per_seed"].items())
        per += " (1.00x: reached at 1x, the smallest budget run; less may do)" if "(1x)" in per else ""
        mean = (f"{u['mean']:.2f}x" + (f" [{u['ci95'][0]:.2f}, {u['ci95'][1]:.2f}]" if u["ci95"] else "")
                if u["mean"] else u["note"])
        lines.append(f"- `{b}`: {mean}; {per}")
    lines += ["", "The paper's measure (the baseline's tokens ÷ the tokens the Grouter's mean curve needs to reach "
              "the baseline's final loss, read between evaluation points):", ""]
    for b, per in s["paper_utilisation"].items():
        lines.append(f"- `{b}`: " + "; ".join(
            f"{m}x: " + (f"{u['value']:.2f}" if u["value"] is not None else "not reached") for m, u in per.items()))
    c = s["costs"]
    p, f, t = c["parameters"], c["forward_flops_per_token"], c["tokens"]
    lines += ["", "## What the Grouter costs", "",
              f"- Parameters: Grouter {p['grouter']:,} vs target {p['target']:,} ({p['grouter_over_target']:.0%}; "
              f"target active per token {p['target_active']:,}).",
              f"- Forward FLOPs per token: Grouter {f['grouter'] / 1e6:.2f}M vs target {f['target'] / 1e6:.2f}M "
              f"({f['grouter_over_target']:.0%} of a forward, {f['grouter_over_target_training']:.0%} of a training "
              f"step; {f['note']}).",
              f"- Tokens of one Grouter run, all stages: " + ", ".join(f"{k} {v:,}" for k, v in
                                                                       t["per_grouter_run"].items())
              + f" = {t['grouter_run_total']:,} ({t['grouter_run_total_over_target']:.1f}x the target's); {t['note']}."]
    ds = s["domain_shift"]
    lines += ["", "## Domain shift (targets trained and scored on code)", "", "| run | final val loss (code) |",
              "|---|---|"]
    for n, v in ds["table"].items():
        lines.append(f"| {n} | {v['mean']:.4f} {_fmt_ci(v['ci95'])} |")
    lines += ["", "| a − b | mean | 95% CI | a is |", "|---|---|---|---|"]
    for c2 in ds["comparisons"]:
        lines.append(f"| {c2['a']} − {c2['b']} | {c2['mean_diff']:+.4f} | {_fmt_ci(c2['ci95'], True)} | {_holds(c2)} |")
    lines += ["", "MaxVio of each Grouter's routes on the code validation windows, folded -> tuned (reported only; "
              "each tuning kept its state by MaxVio on the dev split of the domain it tuned on): " + "; ".join(
        f"{n} {v['before']:.2f} -> {v['after']:.2f}" for n, v in ds["tuning_max_vio"].items()) + ". Top-k agreement "
        "with the own source on code: " + "; ".join(f"{n} {v:.3f}" for n, v in ds["topk_agreement_with_source_on_code"].items())
        + "."]
    return "\n".join(lines) + "\n"

