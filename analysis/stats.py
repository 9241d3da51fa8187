"""The statistics of a comparison table: t-intervals over seeds, Welch or paired t-tests against
the baseline, Holm's step-down correction over a family of comparisons. scipy and statsmodels do
the arithmetic; this module decides which test applies."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Summary:
    """Mean of n seed replicates with its two-sided t-interval (NaN bounds when n < 2)."""

    n: int
    mean: float
    std: float  # sample standard deviation (ddof=1)
    ci_low: float
    ci_high: float


@dataclass(frozen=True)
class Comparison:
    """x - y (a cell minus its baseline): the test used, the difference, its CI and p-value."""

    test: str  # "paired" (same seeds on both sides), "welch", or why there is none ("n<2")
    delta: float
    ci_low: float
    ci_high: float
    p_value: float


def summarize(values: Sequence[float], confidence: float = 0.95) -> Summary:
    """mean ± t_{(1+c)/2, n-1} · s/√n over the finite values."""
    from scipy import stats

    x = _finite(values)
    n = len(x)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(np.mean(x))
    if n < 2:
        return Summary(1, mean, math.nan, math.nan, math.nan)
    std = float(np.std(x, ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


def compare(
    x: Sequence[float],
    y: Sequence[float],
    x_seeds: Sequence | None = None,
    y_seeds: Sequence | None = None,
    confidence: float = 0.95,
) -> Comparison:
    """Two-sided t-test of mean(x) - mean(y). Paired by seed when both sides have the same
    set of (distinct) seeds, at least two; Welch's unequal-variance test otherwise."""
    from scipy import stats

    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep_x, keep_y = np.isfinite(xs), np.isfinite(ys)
    xs, ys = xs[keep_x], ys[keep_y]
    delta = float(np.mean(xs) - np.mean(ys)) if len(xs) and len(ys) else math.nan
    if x_seeds is not None and y_seeds is not None:
        sx = [s for s, k in zip(x_seeds, keep_x, strict=True) if k]
        sy = [s for s, k in zip(y_seeds, keep_y, strict=True) if k]
        if len(set(sx)) == len(sx) >= 2 and set(sx) == set(sy) and len(sy) == len(sx):
            order_y = {s: i for i, s in enumerate(sy)}
            ys_by_x = ys[[order_y[s] for s in sx]]
            res = stats.ttest_rel(xs, ys_by_x)
            low, high = res.confidence_interval(confidence)
            return Comparison("paired", delta, float(low), float(high), float(res.pvalue))
    if len(xs) < 2 or len(ys) < 2:
        return Comparison("n<2", delta, math.nan, math.nan, math.nan)
    res = stats.ttest_ind(xs, ys, equal_var=False)
    low, high = res.confidence_interval(confidence)
    return Comparison("welch", delta, float(low), float(high), float(res.pvalue))


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjustment over the finite p-values (NaN stays NaN), by statsmodels'
    `multipletests(method="holm")`: the i-th smallest of m becomes
    max_{j<=i} min(1, (m - j + 1) p_(j)). Controls the family-wise error rate."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(p_values, dtype=float)
    out = np.full_like(p, np.nan)
    idx = np.flatnonzero(np.isfinite(p))
    if len(idx):
        out[idx] = multipletests(p[idx], method="holm")[1]
    return out


def _finite(values: Sequence[float]) -> np.ndarray:
    x = np.asarray(values, dtype=float)
    return x[np.isfinite(x)]
