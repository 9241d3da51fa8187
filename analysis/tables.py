"""Runs -> the ranked comparison table: one row per cell (norm × batch × seq × any other grid
axis), the headline metric as mean ± t-interval over seeds, Δ vs the baseline norm of the same
regime with a Welch or paired t-test and Holm's correction, best hyperparameters, run counts,
compute and the other inference modes side by side.

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

from analysis.contract import (
    HEADLINE_METRIC,
    HOLM_FAMILIES,
    NORM,
    SEED,
    AnalysisError,
    higher_is_better,
)
from analysis.contract import MAIN_AXES as _MAIN_AXES
from analysis.load import column_kinds
from analysis.stats import compare, holm, summarize
from bln_sweeps.tracking.contract import (
    CONFIRM,
    DIVERGED,
    FAILED,
    FINISHED,
    KIND_TAG,
    PRUNED,
    RUN_FINISHED,
    RUN_RUNNING,
    RUNNING,
    SINGLE,
    STATUS_TAG,
    TEST_LOSS,
    TOKENS_PER_S,
    TRAINING_KINDS,
    TRIAL,
    VAL_LOSS,
    WALL_S,
    logical_metric_name,
)

_ROW_COLUMNS = {
    "cell",
    "leaky",
    "at_edge",
    "trial",
    "device",
    "n_devices",
    "start_time",
    "end_time",
}


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
    logged = [m for m in kinds["metrics"] if train[m].notna().any()]
    if metric not in logged:
        raise AnalysisError(
            f"no run logged metric {metric!r}; metrics: {', '.join(sorted(logged)) or 'none'}"
        )
    train["_kind"] = kind[train.index]
    train["_outcome"] = _outcomes(train)
    rep_kind = CONFIRM if (train["_kind"] == CONFIRM).any() else SINGLE
    if axes is not None:
        missing = [a for a in axes if a not in params]
        if missing:
            raise AnalysisError(
                f"axis {missing[0]!r} is not a param of these runs; params: {', '.join(params)}"
            )
    train["_cell"] = _cell_ids(train, list(axes) if axes is not None else params)

    cell_params, spread = _cell_params(train, params, rep_kind)
    searched = list(spread.columns[(spread > 1).any()])
    if axes is None:
        axes = _find_axes(cell_params, [p for p in params if p not in searched])
    else:
        axes = list(axes)
    regime = [a for a in axes if a != NORM and not a.startswith("norm.")]
    maximize = higher_is_better(metric)

    rows, replicates = [], {}
    # Only the columns a row needs: slicing ~100 columns per cell is what would cost time.
    needed = [c for c in train.columns if c.startswith("_") or c in _ROW_COLUMNS or "/" in c]
    slim = train[[*needed, *[p for p in (SEED, *searched) if p in train]]]
    for cell_id, g in slim.groupby("_cell", sort=False):
        varied = list(spread.columns[spread.loc[cell_id] > 1]) if cell_id in spread.index else []
        row, values = _cell_row(
            g, varied, cell_params.loc[cell_id], axes, metric, rep_kind, confidence
        )
        rows.append(row)
        replicates[len(rows) - 1] = values
    table = pd.DataFrame(rows)
    for a in axes:
        table[a] = table[a].astype(train[a].dtype)

    if baseline is not None:
        norms = sorted(train[NORM].dropna().unique()) if NORM in train else []
        if NORM not in axes or baseline not in norms:
            raise AnalysisError(
                f"baseline norm {baseline!r} is not in the selection; norms: "
                f"{', '.join(map(str, norms)) or 'none (no norm.name param)'}"
            )
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
# Cells


def _outcomes(train: pd.DataFrame) -> pd.Series:
    """How each training run ended: finished, pruned, diverged, failed or running. The `status`
    tag says it; a run without one falls back to MLflow's own run status."""
    tag = train[STATUS_TAG] if STATUS_TAG in train else pd.Series(pd.NA, index=train.index)
    mlflow = (
        train["mlflow_status"] if "mlflow_status" in train else pd.Series("", index=train.index)
    )
    done = tag.isin([FINISHED, PRUNED, DIVERGED]).to_numpy(bool)
    running = (mlflow == RUN_RUNNING).to_numpy(bool)  # incl. a preempted run resumed since
    untagged_ok = (tag.isna() & (mlflow == RUN_FINISHED)).to_numpy(bool)
    out = np.select(
        [done, running, untagged_ok],
        [tag.astype(object).to_numpy(), RUNNING, FINISHED],
        default=FAILED,  # failed, preempted (and not resumed), or an unknown status
    )
    out = pd.Series(out, index=train.index, dtype=object)
    return out


def _cell_ids(train: pd.DataFrame, params: list[str]) -> pd.Series:
    """A cell is the `cell` tag of a sweep run; runs without one (bln-train) form cells of the
    same `params` but the seed (all params, or the axes the caller gave)."""
    ids = pd.Series("", index=train.index, dtype=object)
    tagged = train["cell"].notna() if "cell" in train else pd.Series(False, index=train.index)
    ids[tagged] = "cell:" + train.loc[tagged, "cell"].astype(str)
    untagged = train[~tagged]
    if len(untagged):
        cols = [p for p in params if p != SEED]
        key = untagged.groupby(cols, dropna=False, sort=False).ngroup() if cols else 0
        ids[~tagged] = "params:" + pd.Series(key, index=untagged.index).astype(str)
    return ids


def _cell_params(
    train: pd.DataFrame, params: list[str], rep_kind: str
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per cell, the value of every param that is constant over the cell's replicate runs (or
    its trials when it has none; NaN where it varies), and per cell the number of values each
    param takes across its trials (> 1: searched)."""
    is_rep = train["_kind"] == rep_kind
    has_rep = is_rep.groupby(train["_cell"]).transform("any")
    basis = train[is_rep | ~has_rep]
    cols = [p for p in params if p != SEED]
    grouped = basis.groupby("_cell", sort=False)[cols]
    constant = grouped.nunique(dropna=False) == 1
    values = grouped.first().where(constant)
    trials = train[train["_kind"] == TRIAL]
    spread = trials.groupby("_cell", sort=False)[cols].nunique(dropna=False)
    values["_constant"] = [list(constant.columns[r]) for r in constant.to_numpy()]
    return values, spread


def _find_axes(cell_params: pd.DataFrame, candidates: list[str]) -> list[str]:
    """norm.name, batch.size, seq.len, then each other param that splits cells the axes so far
    leave together (preferring `*.name` keys and short paths, so that model.name is chosen and
    model.n_layer, which it implies, is not)."""
    constant_everywhere = set.intersection(*(set(c) for c in cell_params["_constant"]))
    axes = [a for a in _MAIN_AXES if a in candidates]
    others = [c for c in candidates if c not in axes and c in constant_everywhere]
    others.sort(key=lambda c: (not c.endswith(".name"), c.count("."), c))
    for c in others:
        keys = cell_params[axes].astype(str) if axes else None
        spread = (
            cell_params.groupby([keys[a] for a in axes], dropna=False)[c].nunique(dropna=False)
            if axes
            else pd.Series([cell_params[c].nunique(dropna=False)])
        )
        if (spread > 1).any():
            axes.append(c)
    return axes


def _cell_row(
    g: pd.DataFrame,
    varied: list[str],
    cell_params: pd.Series,
    axes: list[str],
    metric: str,
    rep_kind: str,
    confidence: float,
) -> tuple[dict, dict]:
    row: dict = {a: cell_params.get(a, np.nan) for a in axes}
    row["cell"] = g["cell"].dropna().iloc[0] if "cell" in g and g["cell"].notna().any() else None
    row["leaky"] = bool(g["leaky"].fillna(False).any()) if "leaky" in g else False
    reps = g[g["_kind"] == rep_kind]
    row["at_edge"] = _at_edge(reps)
    used = reps[(reps["_outcome"] == FINISHED) & np.isfinite(reps[metric].astype(float))]
    s = summarize(used[metric].to_numpy(float), confidence)
    row.update(
        n_seeds=s.n,
        n_replicates=len(reps),
        mean=s.mean,
        std=s.std,
        ci_low=s.ci_low,
        ci_high=s.ci_high,
    )
    for m in sorted(c for c in g.columns if _is_split_loss(c) and c != metric):
        row[m] = _mean(used[m])
    # the train/inference gap on the split the table reports (val for val metrics)
    split = metric.split("/", 1)[0] if metric.startswith("test/") else "val"
    pop, batch = f"{split}/loss", f"{split}/loss@batch"
    if batch in g and pop in g:
        gap = summarize((used[batch] - used[pop]).to_numpy(float))
        row.update(batch_gap=gap.mean, batch_gap_ci_low=gap.ci_low, batch_gap_ci_high=gap.ci_high)
    row.update(_best_trial(g, metric, varied))
    counts = g["_outcome"].value_counts()
    row["n_runs"] = len(g)
    for outcome in (FINISHED, PRUNED, DIVERGED, FAILED, RUNNING):
        row[f"n_{outcome}"] = int(counts.get(outcome, 0))
    row.update(_device_hours(g))
    row["tokens_per_s"] = _mean(used[TOKENS_PER_S]) if TOKENS_PER_S in g else np.nan
    seeds = used[SEED].tolist() if SEED in used else None
    return row, {"values": used[metric].to_numpy(float), "seeds": seeds}


def _best_trial(g: pd.DataFrame, metric: str, varied: list[str]) -> dict:
    """The best finished trial of the cell, with the params that vary across its trials and its
    value of `metric`. For a test-split metric the best is the trial the search selected, by
    the selection split (`test/loss@batch` -> `val/loss@batch`): test data never picks it."""
    trials = g[g["_kind"] == TRIAL]
    select = "val/" + metric[len("test/") :] if metric.startswith("test/") else metric
    select = select if select in g else metric
    ok = trials[(trials["_outcome"] == FINISHED) & trials[select].notna()]
    if ok.empty:
        return {"best_value": np.nan, "best_trial": pd.NA, "best_params": None}
    vals = ok[select].astype(float)
    best = ok.loc[vals.idxmax() if higher_is_better(select) else vals.idxmin()]
    text = ", ".join(f"{p}={_fmt(best[p])}" for p in varied)
    trial = best["trial"] if "trial" in best.index else pd.NA
    return {"best_value": float(best[metric]), "best_trial": trial, "best_params": text}


def _device_hours(g: pd.DataFrame) -> dict:
    """Accelerator- and CPU-hours of every training run of the cell: perf/wall_s (or the run's
    start-to-end time when it died before logging it) × n_devices."""
    wall = g[WALL_S].astype(float) if WALL_S in g else pd.Series(np.nan, index=g.index)
    elapsed = (g["end_time"] - g["start_time"]).dt.total_seconds() if "end_time" in g else wall
    wall = wall.fillna(elapsed).fillna(0.0)
    n = g["n_devices"].fillna(1).astype(float) if "n_devices" in g else 1.0
    hours = wall * n / 3600
    device = g["device"].fillna("cpu") if "device" in g else pd.Series("cpu", index=g.index)
    gpu = device.str.startswith("cuda")
    return {"gpu_hours": float(hours[gpu].sum()), "cpu_hours": float(hours[~gpu].sum())}


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
    modes = sorted(c for c in table.columns if _is_split_loss(c))
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


def _is_split_loss(column: str) -> bool:
    """A held-out loss column: `val/loss...` (selection) or `test/loss...` (reporting)."""
    return column.startswith((VAL_LOSS, TEST_LOSS))


def _at_edge(reps: pd.DataFrame) -> str:
    """The replicates' `at_edge` tag (searched keys whose best value is at an edge of its
    range, e.g. `optim.lr:high`); "" when none is, or the runs do not say."""
    if "at_edge" not in reps:
        return ""
    tags = reps["at_edge"].dropna().astype(str)
    tags = tags[tags != ""]
    return tags.iloc[0] if len(tags) else ""


def _mean(values: pd.Series) -> float:
    x = values.to_numpy(float)
    x = x[np.isfinite(x)]
    return float(np.mean(x)) if len(x) else np.nan


def _fmt(value) -> str:
    if isinstance(value, float | np.floating):
        return f"{value:.6g}"
    return str(value)
