"""Paired comparisons over seeds: the mean difference, its Student-t confidence interval, and a verdict.

Two methods trained on the same seed share the data order and the initialisation, so the per-seed
difference of their test AUCs removes the seed-to-seed variation both share; the interval is
mean ± t(1 - alpha/2, n - 1) * sd / sqrt(n) over the n seeds where both have a result. The t
quantile is computed here (regularised incomplete beta, then bisection) so that no SciPy is needed.
"""

from __future__ import annotations

import math
import statistics
from typing import Dict, Optional, Sequence


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b) for x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The `p` quantile of Student's t with `df` degrees of freedom (bisection on `t_cdf`, to 1e-12)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile: p in (0, 1) and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
    while hi - lo > 1e-12 * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


def verdict(lo: Optional[float], hi: Optional[float]) -> str:
    """"better" when the interval lies above 0, "worse" when below, "tied" when it holds 0, "n/a" without one."""
    if lo is None or hi is None:
        return "n/a"
    return "better" if lo > 0 else "worse" if hi < 0 else "tied"


def paired_difference(a: Dict[int, float], b: Dict[int, float], confidence: float = 0.95) -> Dict[str, object]:
    """Mean of a[s] - b[s] over the seeds both have, its `confidence` t interval (None below 2 seeds) and verdict."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    out: Dict[str, object] = {"seeds": seeds, "n": len(diffs), "diffs": diffs, "mean": None, "std": None,
                              "lo": None, "hi": None, "confidence": confidence}
    if diffs:
        out["mean"] = statistics.fmean(diffs)
    if len(diffs) >= 2:
        sd = statistics.stdev(diffs)
        half = t_quantile(0.5 + confidence / 2.0, len(diffs) - 1) * sd / math.sqrt(len(diffs))
        out.update(std=sd, lo=out["mean"] - half, hi=out["mean"] + half)
    out["verdict"] = verdict(out["lo"], out["hi"])  # type: ignore[arg-type]
    return out


def mean_std(values: Sequence[float]) -> Dict[str, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
