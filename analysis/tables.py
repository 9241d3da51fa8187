"""Runs -> the ranked comparison table: one row per cell (norm × batch × seq × any other grid
axis), the headline metric as mean ± t-interval over seeds, Δ vs the baseline norm of the same
regime with a Welch or paired t-test and Holm's correction, best hyperparameters, run counts,
compute and the other inference modes side by side. The rows themselves (runs -> cells -> one
row each) are analysis.cells'; this module compares, ranks and orders them.

    runs = load_runs("default", uri)
    table = comparison_table(runs, metric="val/loss", baseline="layernorm")
    pivot(table, "batch.size")          # norm × micro-batch size, mean of the metric

Seed replicates are the `confirm` runs (a cell's best config re-run with several seeds); a
selection without any (e.g. `bln-train -m ... seed=0,1,2`) uses its `single` runs, grouped by
every param but the seed. Only finished runs with a finite metric enter the statistics; the
others are counted (`n_pruned`, `n_diverged`, `n_failed`). Best hyperparameters come from the
cell's `trial` runs: the params that vary across them, taken from the best finished trial.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from analysis.cells import (
    cell_ids,
    cell_params,
    cell_rows,
    find_axes,
    is_split_loss,
    outcomes,
)
from analysis.contract import (
    HEADLINE_METRIC,
    HOLM_FAMILIES,
    NORM,
    AnalysisError,
    higher_is_better,
)
from analysis.contract import MAIN_AXES as _MAIN_AXES
from analysis.load import column_kinds
from analysis.stats import compare, holm
from bln_sweeps.tracking.contract import (
    CONFIRM,
    KIND_TAG,
    SINGLE,
    TRAINING_KINDS,
    logical_metric_name,
)


def comparison_table(
    runs: pd.DataFrame,
    metric: str = HEADLINE_METRIC,
    baseline: str | None = "layernorm",
    *,
    axes: Sequence[str] | None = None,
    confidence: float = 0.95,
    alpha: float = 0.05,
    holm_family: str = "all",
) -> pd.DataFrame:
    """The ranked comparison table of a runs frame (see the module docstring for the rows).

    metric: the headline metric, either spelling (`val/loss@batch` or `val/loss:batch`); lower
        is better except for throughput metrics (perf/tokens_per_s, perf/mfu).
    baseline: the norm every other norm is compared with, within the same regime (the same
        values of every axis but the norm's own); None for no comparisons.
    axes: the cell axes; default: norm.name, batch.size, seq.len and every other param that
        splits cells (constant within a cell, not searched, not implied by the other axes).
    holm_family: "all" corrects every comparison of the table together; "regime" each regime's
        (the same values of every axis but the norm) separately. The caption says which.

    Rows are sorted by regime, then rank (1 = best in the regime). `table.attrs` records the
    metric, baseline, axes and confidence. Raises AnalysisError for a metric no run has, a
    baseline that is not in the selection, or a selection without training runs.
    """
    metric = logical_metric_name(metric)
    if holm_family not in HOLM_FAMILIES:
        raise AnalysisError(
            f"holm family {holm_family!r}: valid choices: {', '.join(HOLM_FAMILIES)}"
        )
    kinds = column_kinds(runs)
    params = kinds["params"]
    train = _training_runs(runs, metric, kinds["metrics"])
    rep_kind = CONFIRM if (train["_kind"] == CONFIRM).any() else SINGLE
    axes, cells, spread, searched = _assign_cells(train, params, axes, rep_kind)
    regime = [a for a in axes if a != NORM and not a.startswith("norm.")]
    maximize = higher_is_better(metric)
    table, replicates = cell_rows(
        train, cells, spread, searched, axes, metric, rep_kind, confidence
    )
    _check_baseline(train, axes, baseline)
    _compare_to_baseline(table, replicates, baseline, regime, maximize, confidence, alpha)
    _adjust(table, regime if holm_family == "regime" else [], alpha)
    table["rank"] = _ranks(table, regime, maximize)
    table = _sort(table, regime, maximize)
    table.attrs.update(
        metric=metric,
        baseline=baseline,
        axes=list(axes),
        regime_axes=regime,
        confidence=confidence,
        alpha=alpha,
        replicates=rep_kind,
        higher_is_better=maximize,
        holm_family=holm_family,
    )
    return table[_column_order(table, axes)]


def _training_runs(runs: pd.DataFrame, metric: str, metrics: list[str]) -> pd.DataFrame:
    """The runs that trained a model (kind trial, confirm or single; untagged: single), with
    their kind in `_kind` and how they ended in `_outcome`. Raises AnalysisError when there are
    none, or when none of them logged `metric`."""
    kind = (
        runs[KIND_TAG].fillna(SINGLE) if KIND_TAG in runs else pd.Series(SINGLE, index=runs.index)
    )
    train = runs[kind.isin(TRAINING_KINDS)].copy()
    if train.empty:
        counts = ", ".join(f"{k}: {n}" for k, n in kind.value_counts().sort_index().items())
        raise AnalysisError(
            f"no training runs (kind trial, confirm or single) in the selection; kinds: "
            f"{counts or 'no runs at all'}"
        )
    logged = [m for m in metrics if train[m].notna().any()]
    if metric not in logged:
        raise AnalysisError(
            f"no run logged metric {metric!r}; metrics: {', '.join(sorted(logged)) or 'none'}"
        )
    train["_kind"] = kind[train.index]
    train["_outcome"] = outcomes(train)
    return train


def _assign_cells(
    train: pd.DataFrame, params: list[str], axes: Sequence[str] | None, rep_kind: str
) -> tuple[list[str], pd.DataFrame, pd.DataFrame, list[str]]:
    """Each run's cell in `_cell` (by the given axes, or every param). Returns the cell axes (the
    given ones, or found), cell_params' pair (each cell's constant params, the spread of each
    param over a cell's trials) and the params searched in any cell."""
    if axes is not None:
        missing = [a for a in axes if a not in params]
        if missing:
            raise AnalysisError(
                f"axis {missing[0]!r} is not a param of these runs; params: {', '.join(params)}"
            )
    train["_cell"] = cell_ids(train, list(axes) if axes is not None else params)
    cells, spread = cell_params(train, params, rep_kind)
    searched = list(spread.columns[(spread > 1).any()])
    if axes is None:
        axes = find_axes(cells, [p for p in params if p not in searched])
    else:
        axes = list(axes)
    return axes, cells, spread, searched


def _check_baseline(train: pd.DataFrame, axes: list[str], baseline: str | None) -> None:
    """The baseline norm (when there is one) must be a cell of the selection."""
    if baseline is None:
        return
    norms = sorted(train[NORM].dropna().unique()) if NORM in train else []
    if NORM not in axes or baseline not in norms:
        raise AnalysisError(
            f"baseline norm {baseline!r} is not in the selection; norms: "
            f"{', '.join(map(str, norms)) or 'none (no norm.name param)'}"
        )


def pivot(table: pd.DataFrame, column: str, values: str = "mean") -> pd.DataFrame:
    """One axis across, the others down: e.g. norm × micro-batch size of the mean metric."""
    axes = table.attrs.get("axes") or [c for c in _MAIN_AXES if c in table]
    if column not in axes:
        raise AnalysisError(f"pivot axis {column!r} is not an axis; axes: {', '.join(axes)}")
    index = [a for a in axes if a != column]
    wide = table.set_index([*index, column])[values].unstack(column)
    wide.columns.name = column
    return wide


# ---------------------------------------------------------------------------------------------
# Comparisons, ranks, order


def _compare_to_baseline(
    table: pd.DataFrame,
    replicates: dict,
    baseline: str | None,
    regime: list[str],
    maximize: bool,
    confidence: float,
    alpha: float,
) -> None:
    cols = ["delta", "delta_ci_low", "delta_ci_high", "p_value"]
    for c in cols:
        table[c] = np.nan
    table["test"] = None
    if baseline is None:
        table["p_holm"] = np.nan
        table["significant"] = pd.array([pd.NA] * len(table), dtype="boolean")
        return
    keys = _regime_keys(table, regime)
    for idx in table.groupby(keys, sort=False).groups.values():
        group = table.loc[idx]
        base = group[group[NORM] == baseline]
        if len(base) > 1:  # several baseline variants: compare against the strongest
            best = base["mean"].idxmax() if maximize else base["mean"].idxmin()
            base = base.loc[[best]] if pd.notna(best) else base.iloc[:1]
        for i in idx:
            if len(base) and i == base.index[0]:
                table.loc[i, "test"] = "baseline"
                continue
            if base.empty:
                table.loc[i, "test"] = "no baseline"
                continue
            x, y = replicates[i], replicates[base.index[0]]
            c = compare(x["values"], y["values"], x["seeds"], y["seeds"], confidence)
            table.loc[i, cols] = [c.delta, c.ci_low, c.ci_high, c.p_value]
            table.loc[i, "test"] = c.test


def _adjust(table: pd.DataFrame, family: list[str], alpha: float) -> None:
    """Holm-adjusted p-values within each family: the whole table (family = []) or each regime
    (family = the regime axes)."""
    if "p_holm" in table:  # no baseline: nothing was compared
        return
    table["p_holm"] = np.nan
    for idx in table.groupby(_regime_keys(table, family), sort=False).groups.values():
        table.loc[idx, "p_holm"] = holm(table.loc[idx, "p_value"].to_numpy(float))
    sig = pd.array(table["p_holm"] < alpha, dtype="boolean")
    sig[np.isnan(table["p_holm"].to_numpy(float))] = pd.NA
    table["significant"] = sig


def _regime_keys(table: pd.DataFrame, regime: list[str]) -> list[pd.Series] | pd.Series:
    if not regime:
        return pd.Series(0, index=table.index)
    return [table[a].astype(str) for a in regime]


def _ranks(table: pd.DataFrame, regime: list[str], maximize: bool) -> pd.Series:
    keys = _regime_keys(table, regime)
    ranks = table.groupby(keys, sort=False)["mean"].rank(method="min", ascending=not maximize)
    return ranks.astype("Int64")


def _sort(table: pd.DataFrame, regime: list[str], maximize: bool) -> pd.DataFrame:
    keys = [*regime, "rank", NORM] if NORM in table else [*regime, "rank"]
    return table.sort_values(keys, na_position="last", kind="stable").reset_index(drop=True)


def _column_order(table: pd.DataFrame, axes: list[str]) -> list[str]:
    head = [
        *axes,
        "cell",
        "leaky",
        "at_edge",
        "rank",
        "n_seeds",
        "n_replicates",
        "mean",
        "std",
        "ci_low",
        "ci_high",
        "delta",
        "delta_ci_low",
        "delta_ci_high",
        "test",
        "p_value",
        "p_holm",
        "significant",
    ]
    modes = sorted(c for c in table.columns if is_split_loss(c))
    tail = [
        "batch_gap",
        "batch_gap_ci_low",
        "batch_gap_ci_high",
        "best_value",
        "best_trial",
        "best_params",
        "n_runs",
        "n_finished",
        "n_pruned",
        "n_diverged",
        "n_failed",
        "n_running",
        "gpu_hours",
        "cpu_hours",
        "tokens_per_s",
    ]
    return [c for c in [*head, *modes, *tail] if c in table.columns]
