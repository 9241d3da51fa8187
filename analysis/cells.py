"""Runs -> cells: how each training run ended, which cell it belongs to, the axes that split
cells, and one table row per cell (the metric's summary over seed replicates, the best trial, run
counts and compute). analysis.tables compares and ranks these rows.

    train["_outcome"] = outcomes(train)
    train["_cell"] = cell_ids(train, params)
    cells, spread = cell_params(train, params, rep_kind)
    table, replicates = cell_rows(train, cells, spread, searched, axes, metric, rep_kind, 0.95)

A cell is the `cell` tag of a sweep run, or for runs without one (bln-train) the same params but
the seed. Columns starting with `_` (`_kind`, `_outcome`, `_cell`) are this module's bookkeeping.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.contract import MAIN_AXES as _MAIN_AXES
from analysis.contract import SEED, higher_is_better
from analysis.stats import summarize
from bln_sweeps.tracking.contract import (
    DIVERGED,
    FAILED,
    FINISHED,
    PRUNED,
    RUN_FINISHED,
    RUN_RUNNING,
    RUNNING,
    STATUS_TAG,
    TEST_LOSS,
    TOKENS_PER_S,
    TRIAL,
    VAL_LOSS,
    WALL_S,
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


def outcomes(train: pd.DataFrame) -> pd.Series:
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


def cell_ids(train: pd.DataFrame, params: list[str]) -> pd.Series:
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


def cell_params(
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


def find_axes(cells: pd.DataFrame, candidates: list[str]) -> list[str]:
    """norm.name, batch.size, seq.len, then each other param that splits cells the axes so far
    leave together (preferring `*.name` keys and short paths, so that model.name is chosen and
    model.n_layer, which it implies, is not)."""
    constant_everywhere = set.intersection(*(set(c) for c in cells["_constant"]))
    axes = [a for a in _MAIN_AXES if a in candidates]
    others = [c for c in candidates if c not in axes and c in constant_everywhere]
    others.sort(key=lambda c: (not c.endswith(".name"), c.count("."), c))
    for c in others:
        keys = cells[axes].astype(str) if axes else None
        spread = (
            cells.groupby([keys[a] for a in axes], dropna=False)[c].nunique(dropna=False)
            if axes
            else pd.Series([cells[c].nunique(dropna=False)])
        )
        if (spread > 1).any():
            axes.append(c)
    return axes


def cell_rows(
    train: pd.DataFrame,
    cells: pd.DataFrame,
    spread: pd.DataFrame,
    searched: list[str],
    axes: list[str],
    metric: str,
    rep_kind: str,
    confidence: float,
) -> tuple[pd.DataFrame, dict]:
    """One row per cell (cell_row), and per row its replicates' metric values and seeds."""
    rows, replicates = [], {}
    # Only the columns a row needs: slicing ~100 columns per cell is what would cost time.
    needed = [c for c in train.columns if c.startswith("_") or c in _ROW_COLUMNS or "/" in c]
    slim = train[[*needed, *[p for p in (SEED, *searched) if p in train]]]
    for cell_id, g in slim.groupby("_cell", sort=False):
        varied = list(spread.columns[spread.loc[cell_id] > 1]) if cell_id in spread.index else []
        row, values = cell_row(g, varied, cells.loc[cell_id], axes, metric, rep_kind, confidence)
        rows.append(row)
        replicates[len(rows) - 1] = values
    table = pd.DataFrame(rows)
    for a in axes:
        table[a] = table[a].astype(train[a].dtype)
    return table, replicates


def cell_row(
    g: pd.DataFrame,
    varied: list[str],
    values: pd.Series,
    axes: list[str],
    metric: str,
    rep_kind: str,
    confidence: float,
) -> tuple[dict, dict]:
    row: dict = {a: values.get(a, np.nan) for a in axes}
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
    for m in sorted(c for c in g.columns if is_split_loss(c) and c != metric):
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


def is_split_loss(column: str) -> bool:
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
