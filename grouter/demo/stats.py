"""The demo's statistics: paired seed differences with t-intervals, and the paper's data utilisation."""

from __future__ import annotations

import math
import statistics
from typing import Dict, List, Optional

# Two-sided 95% quantiles of Student's t, by degrees of freedom (1..30); beyond: the normal's.
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(df: int) -> float:
    return T975[df - 1] if df <= len(T975) else 1.960


def mean_ci(values: List[float]) -> Dict:
    """Mean and 95% t-interval of values (ci95 None, with a reason, below two values)."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return dict(mean=mean, ci95=None, n=n, reason="one seed: no interval")
    half = t975(n - 1) * statistics.stdev(values) / math.sqrt(n)
    return dict(mean=mean, ci95=[mean - half, mean + half], n=n)


def paired(a: Dict[int, float], b: Dict[int, float]) -> Dict:
    """Paired differences a - b over the seeds both have: mean, 95% t-interval, the seeds."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return dict(mean_diff=None, ci95=None, seeds=[], reason="no seed in common")
    m = mean_ci([a[s] - b[s] for s in seeds])
    out = dict(mean_diff=m["mean"], ci95=m["ci95"], seeds=seeds)
    if m["ci95"] is None:
        out["reason"] = m["reason"]
    return out


def by_seed(results: List[Dict], key: str = "final_val_loss") -> Dict[int, float]:
    """{seed: result[key]} of one run's seeds."""
    return {r["seed"]: r[key] for r in results}


def comparison(a: Dict[int, float], b: Dict[int, float], a_name: str, b_name: str, **extra) -> Dict:
    """a - b paired over seeds, named, with its verdict (and `extra` fields)."""
    d = paired(a, b)
    return dict(a=a_name, b=b_name, **d, verdict=verdict(d), **extra)


def verdict(diff: Dict, better: str = "lower") -> str:
    """What a paired interval of a - b (losses: lower is better) says."""
    ci = diff.get("ci95")
    if ci is None:
        return "no interval (" + diff.get("reason", "") + ")"
    if ci[1] < 0:
        return "a is better (the interval lies below 0)"
    if ci[0] > 0:
        return "b is better (the interval lies above 0)"
    return "cannot tell (the interval contains 0)"


def tokens_to_reach(curve: List[List[float]], loss: float) -> Optional[float]:
    """First token count at which a validation curve reaches `loss` (linear between eval points;
    at or before the first point: that point's tokens)."""
    prev = None
    for tokens, value in curve:
        if value <= loss:
            if prev is None or prev[1] == value:
                return float(tokens)
            t0, v0 = prev
            return float(t0 + (tokens - t0) * (v0 - loss) / (v0 - value))
        prev = (tokens, value)
    return None


def data_utilization(run: Dict, baseline: str, base: Dict) -> Dict:
    """The paper's measure: the baseline's total tokens / the tokens `run` needs to reach the
    baseline's final loss (mean curves over seeds). None, with the reason, when it never does."""
    budget, target = base["val_curve"][-1][0], base["final_val_loss"]
    need = tokens_to_reach(run["val_curve"], target)
    out = dict(baseline=baseline, definition="paper", baseline_tokens=budget, baseline_final_val_loss=target)
    if need is None:
        return dict(out, value=None, reason=f"never reaches {baseline}'s final loss {target:.4f} within "
                    f"{run['val_curve'][-1][0]:,.0f} tokens (its own final: {run['final_val_loss']:.4f})")
    out.update(value=budget / need, run_tokens=need, reason=None)
    if need <= run["val_curve"][0][0]:
        out["reason"] = "reached at the first evaluation point: the value is a lower bound"
    return out
