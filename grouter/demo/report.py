"""The demo's report: report.json, report.md and PNG plots."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Dict, List

from .config import BASELINES, GROUTER_RUNS
from .stats import by_seed, comparison, data_utilization, mean_ci, paired


def summarize(results: List[Dict]) -> Dict:
    """A run's seeds: mean curve with a 95% band per point, finals per seed, throughput, balance."""
    curves = [r["val_curve"] for r in results]
    finals = [r["final_val_loss"] for r in results]
    points = [mean_ci([c[i][1] for c in curves]) for i in range(len(curves[0]))]
    out = dict(val_curve=[[curves[0][i][0], p["mean"]] for i, p in enumerate(points)],
               val_curve_ci95=[p["ci95"] for p in points],
               final_val_loss=statistics.fmean(finals), final_val_loss_ci95=mean_ci(finals)["ci95"],
               final_val_loss_spread=(max(finals) - min(finals)) if len(finals) > 1 else None,
               final_val_loss_per_seed=finals, seeds=len(results),
               tokens_per_s=statistics.fmean(r["tokens_per_s"] for r in results),
               max_vio=statistics.fmean(r["max_vio"] for r in results),
               per_seed=[{k: v for k, v in r.items() if k != "load"} for r in results], load=results[0]["load"],
               split=dict(final_val_loss="validation", val_curve="validation", max_vio="training", load="training"))
    if "audit_prefix_only_val_loss" in results[0]:
        prefix = [r["audit_prefix_only_val_loss"] for r in results]
        own = [r["audit_own_val_loss"] for r in results]
        out.update(audit_prefix_only_val_loss=statistics.fmean(prefix), audit_own_val_loss=statistics.fmean(own),
                   audit_prefix_only_val_loss_per_seed=prefix, audit_windows=results[0]["audit_windows"])
    return out


def comparisons(runs: Dict[str, List[Dict]]) -> List[Dict]:
    """grouter - every other run, paired by seed (same initialisation and data order)."""
    out = []
    for b in runs:
        if b != "grouter":
            out.append(comparison(by_seed(runs["grouter"]), by_seed(runs[b]), "grouter", b, split="validation"))
    return out


PREFIX_ONLY_MEASURES = ("the same trained model scored with prefix-only routes minus with its own: 0 for a causal "
                        "Grouter; for a bidirectional one, the leak plus a route distribution the model never "
                        "trained on")


def leak_audit(runs: Dict[str, List[Dict]]) -> Dict:
    out = {}
    if "grouter_bidirectional" in runs and "grouter" in runs:
        out["bidirectional_vs_causal"] = comparison(
            by_seed(runs["grouter_bidirectional"]), by_seed(runs["grouter"]), "grouter_bidirectional", "grouter",
            measures="both scored with the routes they trained with: what reading future tokens is worth to "
                     "training and scoring together (the paper's encoder vs a Grouter generation can use)")
    prefix = {}
    for name in GROUTER_RUNS:
        if name in runs and "audit_prefix_only_val_loss" in runs[name][0]:  # a table reads no other token
            d = paired(by_seed(runs[name], "audit_prefix_only_val_loss"), by_seed(runs[name], "audit_own_val_loss"))
            prefix[name] = dict(**d, measures=PREFIX_ONLY_MEASURES)
    out["prefix_only_minus_own"] = prefix
    return out


def utilisation(summary: Dict[str, Dict]) -> Dict[str, Dict]:
    present = [b for b in BASELINES if b in summary]
    best = min(present, key=lambda b: summary[b]["final_val_loss"])
    out = {}
    for name in GROUTER_RUNS:
        if name in summary:
            u = data_utilization(summary[name], best, summary[best])
            u["best_baseline"] = True
            u["split"] = "validation"
            if "learned_aux" in summary:
                u["vs_learned_aux"] = data_utilization(summary[name], "learned_aux", summary["learned_aux"])
            out[name] = u
    return out


def distill_summary(grouters: Dict[str, List[Dict]]) -> Dict:
    keys = ("kl_before", "kl_after", "topk_agreement_before", "topk_agreement", "max_vio_folded", "max_vio_tuned")
    per_run = {name: {k: statistics.fmean(m[k] for m in metas) for k in keys if k in metas[0]}
               for name, metas in grouters.items()}
    main = per_run.get("grouter", {})
    dev = [m["tune_dev_max_vio"] for m in grouters.get("grouter", []) if "tune_dev_max_vio" in m]
    heldout = {k: main.get(k) for k in ("kl_before", "kl_after", "topk_agreement_before", "topk_agreement")}
    return dict(heldout=dict(heldout, split="validation"),
                tuning_heldout_max_vio=dict(before=main.get("max_vio_folded"), after=main.get("max_vio_tuned"),
                                            split="validation"),
                tuning_dev_max_vio=dict(before=statistics.fmean(d["before"] for d in dev),
                                        after=statistics.fmean(d["after"] for d in dev), split="dev") if dev else None,
                per_run=per_run, evaluated_on="validation windows (read only to report; no stage trains or "
                                              "selects on them)",
                selected_on="dev windows carved from the training stream (tuning keeps its best state by MaxVio "
                            "there)")


# Where each figure of report.json comes from. Validation is read only to report; every selection
# the demo makes reads dev (carved from the training stream, never trained on).
SPLITS = {
    "runs.*.final_val_loss, val_curve, comparisons, data_utilization": "validation",
    "leak_audit, runs.*.audit_*": "validation (every audit_every-th window)",
    "distill.heldout (KL to the source, top-k agreement)": "validation",
    "distill.tuning_heldout_max_vio (before and after tuning)": "validation",
    "distill.tuning_dev_max_vio (tuning's best-state selection)": "dev",
    "runs.*.per_seed.final_dev_loss (what the study selects learning rates on)": "dev",
    "runs.*.max_vio, runs.*.load": "training (the routes of the tokens each run trained on)",
    "hash_balanced's table": "training (token frequencies)",
    "source.*": "validation (final loss), training (MaxVio)",
}


def _plots(out: Path, summary: Dict[str, Dict], grouters: Dict) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    files = []
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, run in summary.items():
        t, v = (np.array(a) for a in zip(*run["val_curve"]))
        line, = ax.plot(t / 1e6, v, marker="o", ms=3, label=f"{name} ({run['seeds']} seed{'s' * (run['seeds'] > 1)})")
        if all(ci is not None for ci in run["val_curve_ci95"]):
            lo, hi = np.array(run["val_curve_ci95"]).T
            ax.fill_between(t / 1e6, lo, hi, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title("Validation loss vs tokens (bands: 95% interval over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "val_loss.png", dpi=110)
    plt.close(fig)
    files.append("val_loss.png")

    fig, axes = plt.subplots(1, len(summary), figsize=(2.2 * len(summary), 2.8), sharey=True)
    for ax, (name, run) in zip(np.atleast_1d(axes), summary.items()):
        load = np.array(run["load"]).sum(0)
        share = load / max(load.sum(), 1)
        ax.bar(range(len(share)), share)
        ax.axhline(1 / len(share), color="k", lw=0.8, ls="--")
        ax.set_title(f"{name}\nMaxVio {run['max_vio']:.2f}", fontsize=7)
        ax.set_xlabel("expert")
    np.atleast_1d(axes)[0].set_ylabel("share of routed slots")
    fig.tight_layout()
    fig.savefig(out / "expert_load.png", dpi=110)
    plt.close(fig)
    files.append("expert_load.png")

    if grouters.get("grouter"):
        A = np.array(grouters["grouter"][0]["affinity"])
        groups = np.array(grouters["grouter"][0]["groups"])
        order = np.argsort(groups, kind="stable")
        fig, ax = plt.subplots(figsize=(5, 4.5))
        im = ax.imshow(A[np.ix_(order, order)], cmap="viridis")
        for b in np.flatnonzero(np.diff(groups[order])) + 0.5:
            ax.axhline(b, color="w", lw=0.8)
            ax.axvline(b, color="w", lw=0.8)
        ax.set_title("Co-activation affinity (grouter, seed 0),\nexperts ordered by fold group")
        ax.set_xticks(range(len(order)), order, fontsize=6)
        ax.set_yticks(range(len(order)), order, fontsize=6)
        fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        fig.savefig(out / "affinity.png", dpi=110)
        plt.close(fig)
        files.append("affinity.png")
    return files


def _ci(ci) -> str:
    return f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "n/a"


def _util_text(u: Dict) -> str:
    return f"{u['value']:.2f}x" if u["value"] is not None else "not reached"


def _throughput_text(t: Dict) -> str:
    tps = t["tokens_per_s"]
    text = ", ".join(f"`{n}` {v:,.0f} tok/s" for n, v in tps.items())
    ratio = (f"; grouter / learned_aux = {tps['grouter'] / tps['learned_aux']:.3f}"
             if "grouter" in tps and "learned_aux" in tps else "")
    return (f"Training steps measured side by side ({t['method']}, {t['steps']} steps each, {t['threads']} "
            f"thread): {text}{ratio}. The Grouter runs read pre-dispatched routes (their cost is in the bill); "
            "the tokens/s column above depends on what the other job ran beside each run.")


def _markdown(r: Dict) -> str:
    cfg, summary = r["config"], r["runs"]
    rows = ["| run | seeds | final val loss (95% CI) | per seed | prefix-only - own routes | tokens/s | MaxVio | data "
            "utilisation vs best / vs learned_aux |", "|---|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        ci = s["final_val_loss_ci95"]
        mean = f"{s['final_val_loss']:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")
        seeds = ", ".join(f"{v:.4f}" for v in s["final_val_loss_per_seed"])
        lf = (f"{s['audit_prefix_only_val_loss'] - s['audit_own_val_loss']:+.4f}"
              if "audit_prefix_only_val_loss" in s else "")
        u = r["data_utilization"].get(name)
        ut = f"{_util_text(u)} / {_util_text(u['vs_learned_aux'])}" if u and "vs_learned_aux" in u else ""
        rows.append(f"| {name} | {s['seeds']} | {mean} | {seeds} | {lf} | {s['tokens_per_s']:,.0f} | "
                    f"{s['max_vio']:.2f} | {ut} |")
    comp = ["| a - b | seeds | mean diff | 95% CI | verdict |", "|---|---|---|---|---|"]
    for c in r["comparisons"]:
        md = f"{c['mean_diff']:+.4f}" if c["mean_diff"] is not None else "n/a"
        comp.append(f"| {c['a']} - {c['b']} | {len(c['seeds'])} | {md} | {_ci(c['ci95'])} | {c['verdict']} |")
    audit = []
    bd = r["leak_audit"].get("bidirectional_vs_causal")
    if bd:
        audit.append(f"- grouter_bidirectional - grouter: {bd['mean_diff']:+.4f} nats/byte, 95% CI {_ci(bd['ci95'])} "
                     f"({bd['verdict']}). Measures {bd['measures']}.")
    for name, d in r["leak_audit"]["prefix_only_minus_own"].items():
        audit.append(f"- {name}, prefix-only routes - own routes: {d['mean_diff']:+.4f}, 95% CI {_ci(d['ci95'])}.")
    audit.append(f"- Prefix-only minus own measures {PREFIX_ONLY_MEASURES}.")
    util = []
    for name, u in r["data_utilization"].items():
        for v in (u, u.get("vs_learned_aux")):
            if v is None:
                continue
            text = (f"{v['value']:.2f}x (reaches {v['baseline']}'s final {v['baseline_final_val_loss']:.4f} after "
                    f"{v['run_tokens']:,.0f} of {v['baseline_tokens']:,.0f} tokens)" if v["value"] is not None
                    else f"none: {v['reason']}")
            util.append(f"- `{name}` vs `{v['baseline']}`: {text}")
    d, src, weak = r["distill"], r["source"], r["source_weak"]
    h, tun = d["heldout"], d["tuning_heldout_max_vio"]
    fmt = lambda x, p=3: "n/a" if x is None else f"{x:.{p}f}"  # noqa: E731
    cost = ["| stage | tokens | seconds |", "|---|---|---|"]
    cost += [f"| {k} | {v['tokens']:,} | {v['seconds']:.0f} |" for k, v in r["cost"].items()]
    paper = r["paper"]
    return "\n".join([
        "# grouter demo report", "",
        f"Corpus: {r['corpus']}; byte-level BPE, {r['tokenizer']['vocab_size']} tokens "
        f"({r['tokenizer']['bytes_per_token']:.2f} bytes/token), trained on the training split. Model: "
        f"d={cfg['d_model']}, {cfg['n_layers']} layers, {cfg['source_experts']} -> {cfg['target_experts']} experts "
        f"top-{cfg['top_k']}, {cfg['target_tokens']:,} tokens per target run, {cfg['val_windows']} validation "
        f"windows of {cfg['seq_len']} tokens. Wall time {r['wall_seconds']:.0f} s ({r['jobs']} job(s) at a time).",
        "", "## Results", "", *rows, "",
        "Validation loss in nats per byte (the bytes the predicted tokens decode to); 95% t-interval over seeds. "
        "Data utilisation the paper's way: the baseline's total tokens ÷ the tokens the run needs to reach the "
        "baseline's final loss (mean curves).", "",
        "## Paired comparisons (same seed: same initialisation and data order)", "", *comp, "",
        "## Data utilisation", "", *util, "",
        "## Throughput", "", _throughput_text(r["throughput"]), "",
        "## Leak audit", "", *audit, "",
        "## Sources and distillation", "",
        f"- Strong source: {src['tokens']:,} tokens ({src['tokens'] / cfg['target_tokens']:.0f}x a target run), val "
        f"{src['val_loss']:.4f} nats/byte, {src['seconds']:.0f} s ({src['amortised_seconds_per_run']:.0f} s per "
        f"Grouter target run it serves here). Weak source: {weak['tokens']:,} tokens, val {weak['val_loss']:.4f}, "
        f"{weak['seconds']:.0f} s.",
        f"- Held-out distillation (grouter, mean over seeds): KL to the source router {fmt(h['kl_before'])} -> "
        f"{fmt(h['kl_after'])}, top-{cfg['top_k']} agreement {fmt(h['topk_agreement_before'])} -> "
        f"{fmt(h['topk_agreement'])}; tuning, validation MaxVio {fmt(tun['before'], 2)} -> {fmt(tun['after'], 2)} "
        f"(paper: ~8 -> ~0.5), its best state chosen on dev (dev MaxVio {fmt((d['tuning_dev_max_vio'] or {}).get('before'), 2)} "
        f"-> {fmt((d['tuning_dev_max_vio'] or {}).get('after'), 2)}).",
        "- Splits: validation is read only to report; every selection reads dev, carved from the training "
        "stream (report.json `splits`).", "",
        "## The paper's claims", "",
        f"- Same validation loss with {paper['same_loss_with_fraction_of_data']:.1%} of the data "
        f"({paper['data_utilization']}x data utilisation); +{paper['throughput_gain_8gpu']:.1%} throughput on 8 GPUs.",
        f"- Setting: {paper['source']}. This demo is a small model on 2 CPU cores: a gain at this scale is not "
        "assured, and none was tuned for.", "",
        "## Cost (the sources are part of the bill)", "", *cost, "",
        "## Plots", "", *[f"![{p}]({p})" for p in r["plots"]], "",
    ])


def write_report(out: Path, cfg: Dict, runs: Dict[str, List[Dict]], sources: Dict[str, Dict], grouters: Dict,
                 cost: Dict, tokenizer: Dict, throughput: Dict, versions: Dict, paper: Dict, corpus: str, jobs: int,
                 wall_seconds: float, hash_tables: Dict, router_settings: Dict, preset: str = "default") -> Dict:
    summary = {name: summarize(results) for name, results in runs.items()}
    served = {w: sum(len(runs[n]) for n, (src, _) in GROUTER_RUNS.items() if src == w and n in runs)
              for w in sources}

    def source_info(w: str) -> Dict:
        s = sources[w]
        return dict(tokens=s["tokens"], val_loss=s["final_val_loss"], final_val_loss=s["final_val_loss"],
                    seconds=s["seconds"], max_vio=s["max_vio"], target_runs_served=served[w],
                    amortised_seconds_per_run=s["seconds"] / max(1, served[w]))

    report = dict(
        runs=summary, comparisons=comparisons(runs), data_utilization=utilisation(summary),
        leak_audit=leak_audit(runs), distill=distill_summary(grouters), tokenizer=tokenizer,
        source=source_info("strong"), source_weak=source_info("weak"), throughput=throughput, cost=cost, config=cfg,
        seeds={n: [r["seed"] for r in rs] for n, rs in runs.items()}, versions=versions, paper=paper, corpus=corpus,
        splits=SPLITS, hash_tables=hash_tables, router_settings=router_settings, preset=preset,
        grouters={n: [{k: v for k, v in m.items() if k != "affinity"} for m in ms] for n, ms in grouters.items()},
        jobs=jobs, wall_seconds=wall_seconds)
    report["plots"] = _plots(out, summary, grouters)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(_markdown(report))
    return report
