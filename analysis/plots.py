"""Figures of a comparison table, each written as PNG and SVG:

- `metric_vs_axis`: the metric vs micro-batch size (or sequence length), one line per norm, the
  95% CI band over seeds, one panel per value of the other regime axes;
- `heatmap`: norm × micro-batch size, the mean metric in each cell;
- `learning_curves`: validation loss vs step of every confirm run, one panel per regime;
- `batch_gap`: val/loss@batch − val/loss per norm (train-mode batch statistics vs population
  statistics), with its CI.

matplotlib is imported here only, through its object API (no pyplot, no global backend), so
importing analysis stays light and a notebook's backend is left alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analysis.contract import BATCH, NORM, SEQ
from bln_sweeps.tracking.contract import CONFIRM, TOKENS_PER_S, VAL_LOSS, split_metric

AXIS_TITLES = {
    BATCH: "micro-batch size (sequences per forward pass)",
    SEQ: "sequence length (tokens)",
}
SHORT = {BATCH: "micro-batch size", SEQ: "sequence length", NORM: "norm"}


def plot_all(table: pd.DataFrame, out_dir: Path, history: pd.DataFrame | None = None) -> list[Path]:
    """Every figure the table allows (a metric-vs-axis plot needs two or more values of the
    axis), into `out_dir`; returns the files written."""
    out_dir = Path(out_dir)
    paths: list[Path] = []
    axes = table.attrs.get("axes", [])
    swept = [a for a in (BATCH, SEQ) if a in axes and table[a].nunique() > 1]
    for axis in swept:
        paths += save(metric_vs_axis(table, axis), out_dir, f"vs_{axis.split('.')[0]}")
    if NORM in axes and BATCH in swept:
        paths += save(heatmap(table, BATCH), out_dir, "heatmap_norm_batch")
    if history is not None and len(history):
        paths += save(learning_curves(history, table), out_dir, "learning_curves")
    if "batch_gap" in table and table["batch_gap"].notna().any():
        paths += save(batch_gap(table), out_dir, "batch_gap")
    return paths


def save(fig, out_dir: Path, name: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.svg"]
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1])
    return paths


def metric_vs_axis(table: pd.DataFrame, axis: str):
    """Mean metric vs `axis` per norm with its CI band; a panel per other regime."""
    metric = table.attrs.get("metric", "metric")
    panels = _facets(table, exclude=axis)
    fig, axs = _figure(len(panels))
    colors, variants = _colors(table), _variants(table)
    for ax, (panel, sub) in zip(axs, panels, strict=True):
        for label, line in _methods(sub, variants):
            line = line.sort_values(axis)
            x = line[axis].astype(float).to_numpy()
            style = dict(color=colors[label], linestyle="--" if _leaky(line) else "-")
            ax.plot(x, line["mean"], marker="o", label=_legend(label, line), **style)
            ax.fill_between(x, line["ci_low"], line["ci_high"], color=colors[label], alpha=0.18)
        _log2_ticks(ax, table[axis])
        ax.set_xlabel(AXIS_TITLES.get(axis, axis))
        ax.set_ylabel(_metric_label(metric))
        ax.set_title(panel, fontsize=10)
        ax.grid(alpha=0.3)
    _legend_outside(fig, axs)
    pct = round(100 * table.attrs.get("confidence", 0.95))
    _title(fig, f"{metric} vs {SHORT.get(axis, axis)}", f"mean over seeds, band = {pct}% CI")
    return fig


def heatmap(table: pd.DataFrame, axis: str = BATCH):
    """Norm × `axis` grid of the mean metric (annotated), a panel per other regime."""
    metric = table.attrs.get("metric", "metric")
    maximize = table.attrs.get("higher_is_better", False)
    panels = _facets(table, exclude=axis)
    fig, axs = _figure(len(panels), width=5.2)
    variants, leaky = _variants(table), _leaky_methods(table)
    finite = table["mean"][np.isfinite(table["mean"].astype(float))]
    vmin, vmax = (finite.min(), finite.max()) if len(finite) else (0, 1)
    image = None
    for ax, (panel, sub) in zip(axs, panels, strict=True):
        labels = [label for label, _ in _methods(sub, variants)]
        xs = sorted(sub[axis].dropna().unique())
        grid = np.full((len(labels), len(xs)), np.nan)
        for i, (_, line) in enumerate(_methods(sub, variants)):
            for _, r in line.iterrows():
                grid[i, xs.index(r[axis])] = r["mean"]
        cmap = "viridis" if maximize else "viridis_r"  # bright = better
        image = ax.imshow(grid, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                rgba = image.cmap(image.norm(v))
                light = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] > 0.55
                ax.text(j, i, f"{v:.3f}", ha="center", va="center", color="k" if light else "w")
        ax.set_xticks(range(len(xs)), [_text(x) for x in xs])
        ax.set_yticks(
            range(len(labels)), [lb + (f" {_DAGGER}" if lb in leaky else "") for lb in labels]
        )
        ax.set_xlabel(AXIS_TITLES.get(axis, axis))
        ax.set_ylabel("norm")
        ax.set_title(panel, fontsize=10)
    if image is not None:
        fig.colorbar(image, ax=list(axs), label=_metric_label(metric), shrink=0.9)
    better = "bright = better" + (f", {_DAGGER} leaky" if leaky else "")
    _title(fig, f"{metric}: norm × {SHORT.get(axis, axis)}", f"mean over seeds; {better}")
    return fig


def learning_curves(history: pd.DataFrame, table: pd.DataFrame, runs: pd.DataFrame | None = None):
    """Validation loss vs step of the confirm runs: thin lines per seed, the seed mean thick.

    history: columns run_id, step, value (load_history), plus the axis columns of each run
    (merge it with the runs frame first, or pass `runs`)."""
    if runs is not None:
        axes = [a for a in table.attrs.get("axes", []) if a in runs]
        history = history.merge(runs[["run_id", *axes]], on="run_id", how="left")
    metric = history.attrs.get("metric", VAL_LOSS)
    panels = _facets(history, exclude=None, regime=_regime(table))
    fig, axs = _figure(len(panels))
    colors, variants = _colors(table), _variants(table)
    leaky = _leaky_methods(table)
    for ax, (panel, sub) in zip(axs, panels, strict=True):
        for label, part in _methods(sub, variants):
            color = colors.get(label, "k")
            style = "--" if label in leaky else "-"
            for _, run in part.groupby("run_id"):
                ax.plot(run["step"], run["value"], color=color, lw=0.7, alpha=0.35, ls=style)
            mean = part.groupby("step")["value"].mean()
            name = _legend(label, None) + (f" {_DAGGER} leaky" if label in leaky else "")
            ax.plot(mean.index, mean.to_numpy(), color=color, lw=2, ls=style, label=name)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(_metric_label(metric))
        ax.set_title(panel, fontsize=10)
        ax.grid(alpha=0.3)
    _legend_outside(fig, axs)
    kind = "confirm runs" if table.attrs.get("replicates", CONFIRM) == CONFIRM else "seed runs"
    _title(fig, f"{metric} during training", f"{kind}; thin: one seed, thick: seed mean")
    return fig


def batch_gap(table: pd.DataFrame):
    """val/loss@batch − val/loss per norm and regime: below 0, the train-mode forward (batch
    statistics) scores better than the eval-mode one the headline uses."""
    sub = table[table["batch_gap"].notna()]
    variants = _variants(table)
    regimes = _facets(sub, exclude=None, regime=_regime(table))
    labels = [label for label, _ in _methods(sub, variants)]
    fig, axs = _figure(
        1, width=max(4.5, 0.9 * len(labels) * len(regimes) ** 0.5), legend=len(regimes) > 1
    )
    ax = axs[0]
    width = 0.8 / len(regimes)
    palette = _palette(len(regimes))
    for k, (regime, part) in enumerate(regimes):
        rows = dict(_methods(part, variants))
        xs = [i for i, label in enumerate(labels) if label in rows]
        r = pd.concat([rows[labels[i]].iloc[:1] for i in xs])
        err = np.nan_to_num(
            np.array(
                [r["batch_gap"] - r["batch_gap_ci_low"], r["batch_gap_ci_high"] - r["batch_gap"]]
            )
        )
        pos = [i - 0.4 + width * (k + 0.5) for i in xs]
        ax.bar(
            pos, r["batch_gap"], width=width, yerr=err, capsize=3, color=palette[k], label=regime
        )
    ax.axhline(0, color="k", lw=0.8)
    leaky = _leaky_methods(table)
    ax.set_xticks(
        range(len(labels)),
        [_legend(lb, None) + (f" {_DAGGER}" if lb in leaky else "") for lb in labels],
    )
    ax.set_xlabel("norm")
    ax.set_ylabel("val/loss@batch − val/loss (nats/token)")
    ax.grid(axis="y", alpha=0.3)
    pct = round(100 * table.attrs.get("confidence", 0.95))
    note = f"mean over seeds, {pct}% CI; below 0: batch statistics score better"
    if len(regimes) > 1:
        _legend_outside(fig, [ax], title="regime")
    elif regimes[0][0]:
        note = f"{regimes[0][0]}; {note}"
    _title(fig, "Validation loss: batch statistics − population statistics", note)
    return fig


# ---------------------------------------------------------------------------------------------

_DAGGER = "†"


def _title(fig, title: str, note: str) -> None:
    """A title, and under it what the marks mean."""
    fig.suptitle(f"{title}\n{note}", fontsize=11)
    need = 0.08 * max(len(title), len(note)) + 0.5  # inches, so that neither line is cut
    if fig.get_figwidth() < need:
        fig.set_figwidth(need)


def _legend_outside(fig, axs, title: str | None = None) -> None:
    """One legend for all panels, right of them (panels may each lack some norm)."""
    handles: dict = {}
    for ax in axs:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
    if handles:
        fig.legend(
            handles.values(), handles.keys(), loc="outside right upper", fontsize=9, title=title
        )


def _figure(n: int, width: float = 5.0, legend: bool = True):
    """n panels, up to 3 a row, with room on the right for a legend when there is one."""
    from matplotlib.figure import Figure

    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    extra = 2.6 if legend else 0.0
    fig = Figure(figsize=(width * cols + extra, 3.8 * rows + 0.4), layout="constrained")
    axs = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axs[n:]:
        ax.set_visible(False)
    return fig, list(axs[:n])


def _regime(table: pd.DataFrame) -> list[str]:
    return table.attrs.get("regime_axes", [a for a in (BATCH, SEQ) if a in table])


def _facets(frame: pd.DataFrame, exclude: str | None, regime: list[str] | None = None):
    """[(panel title, rows)] over the values of the regime axes other than `exclude`."""
    regime = [a for a in (_regime(frame) if regime is None else regime) if a != exclude]
    regime = [a for a in regime if a in frame]
    if not regime:
        return [("", frame)]
    out = []
    for key, part in frame.groupby(regime, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        title = ", ".join(
            f"{SHORT.get(a, a)} = {_text(v)}" for a, v in zip(regime, key, strict=True)
        )
        out.append((title, part))
    return out


def _variants(table: pd.DataFrame) -> list[str]:
    """Grid axes that make variants of one norm (norm.options.* or norm.final swept)."""
    return [a for a in table.attrs.get("axes", []) if a.startswith("norm.") and a != NORM]


def _method_key(row, variants: list[str]) -> str:
    """A norm and its variant axes: one line, bar or heatmap row per key."""
    extra = ", ".join(
        f"{c.split('.')[-1]}={_text(row[c])}" for c in variants if c in row and pd.notna(row[c])
    )
    return f"{row[NORM]} ({extra})" if extra else str(row[NORM])


def _methods(frame: pd.DataFrame, variants: list[str]) -> list[tuple[str, pd.DataFrame]]:
    keys = pd.Series([_method_key(r, variants) for _, r in frame.iterrows()], index=frame.index)
    return [(k, frame[keys == k]) for k in sorted(keys.unique())]


def _colors(table: pd.DataFrame) -> dict[str, tuple]:
    labels = sorted({_method_key(r, _variants(table)) for _, r in table.iterrows()})
    palette = _palette(len(labels))
    return dict(zip(labels, palette, strict=True))


def _palette(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _leaky(rows: pd.DataFrame) -> bool:
    return bool("leaky" in rows and rows["leaky"].fillna(False).any())


def _leaky_methods(table: pd.DataFrame) -> set[str]:
    if "leaky" not in table:
        return set()
    return {_method_key(r, _variants(table)) for _, r in table.iterrows() if r["leaky"] is True}


def _legend(label: str, rows: pd.DataFrame | None) -> str:
    return f"{label} {_DAGGER} leaky" if rows is not None and _leaky(rows) else label


def _metric_label(metric: str) -> str:
    if metric == VAL_LOSS:
        return "validation loss, population stats (nats/token)"
    base, mode = split_metric(metric)
    if base == VAL_LOSS and mode is not None:
        return f"validation loss, {mode} (nats/token)"
    if metric == TOKENS_PER_S:
        return "throughput (tokens/s)"
    return metric


def _log2_ticks(ax, values: pd.Series) -> None:
    xs = sorted(float(v) for v in values.dropna().unique())
    if len(xs) > 1 and min(xs) > 0:
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.minorticks_off()


def _text(v) -> str:
    if v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v)):
        return "—"
    return f"{v:g}" if isinstance(v, float) else str(v)
