"""One page to send a colleague: `bln-analyze NAME --report report.html`.

A single self-contained HTML file (no network needed to open it: styles inline, figures embedded
as base64 PNG) with, in reading order: what was run (the sweep's command, code SHA, compute used,
whether the budget ended the search), the ranked table and its pivots, the figures
`--plots` writes, and per-cell search diagnostics read from the sweep's Optuna studies: the loss
against each searched parameter with the range edges marked (a best value in the outer tenth of
its range is an unfinished comparison), the optimization history, and the pruned trials.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import math
from pathlib import Path

import pandas as pd

from analysis.export import render
from bln_sweeps.tracking.contract import GIT_DIRTY_TAG, GIT_SHA_TAG

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1400px; color: #222; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; white-space: nowrap; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
dl.facts { display: grid; grid-template-columns: max-content auto; gap: 2px 16px; }
dl.facts dt { font-weight: 600; } dl.facts dd { margin: 0; font-family: monospace; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 12px; } .note { color: #8a4b00; }
"""


def build(
    name: str,
    table: pd.DataFrame,
    runs: pd.DataFrame,
    figures: list[Path],
    manifest: dict | None,
    sweep_dir: Path | None,
) -> str:
    """The report's HTML. `figures`: PNG files (plots.plot_all's); `manifest`/`sweep_dir`: the
    sweep's, when the runs came from a bln-sweep sweep (None for a plain experiment)."""
    cells = search_diagnostics(manifest, sweep_dir) if manifest and sweep_dir else []
    ended = sorted({c["budget_ended"] for c in cells if c["budget_ended"]})
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(name)} · bln-sweeps report</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{esc(name)}</h1>",
        f"<p>bln-sweeps report, generated {dt.datetime.now():%Y-%m-%d %H:%M}</p>",
        "<h2>What was run</h2>",
        facts(table, runs, manifest, ended),
        '<h2 id="table">Ranked table</h2>',
        render(table, "html"),
        '<h2 id="figures">Figures</h2>',
    ]
    pngs = [p for p in figures if p.suffix == ".png"]
    for path in pngs:
        parts.append(figure(path.read_bytes(), path.stem.replace("_", " ")))
    if not pngs:
        parts.append("<p>No figures: the sweep varies too little to plot.</p>")
    parts.append('<h2 id="search">Search diagnostics, per cell</h2>')
    if not cells:
        parts.append("<p>Not a bln-sweep sweep (no Optuna studies): no search diagnostics.</p>")
    for cell in cells:
        parts.append(f"<h3>{esc(cell['name'])}</h3>")
        parts.append(f"<p>{esc(cell['summary'])}</p>")
        for note in cell["notes"]:
            parts.append(f'<p class="note">{esc(note)}</p>')
        if cell["png"] is not None:
            caption = (
                "Left: the objective against each searched parameter (dashed: the range edges;"
                " shaded: its outer tenth; ★ the best trial). Right: the optimization history"
                " (× pruned, at their last reported value; line: best so far)."
            )
            parts.append(figure(cell["png"], caption))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def esc(value) -> str:
    return html.escape(str(value))


def figure(png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure><img alt="{esc(caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def facts(table: pd.DataFrame, runs: pd.DataFrame, manifest: dict | None, ended: list) -> str:
    rows = []
    if manifest:
        rows.append(("command", manifest.get("command", "—")))
    sha_col, dirty_col = f"tags.{GIT_SHA_TAG}", f"tags.{GIT_DIRTY_TAG}"
    shas = sorted(set(runs[sha_col].dropna())) if sha_col in runs else []
    dirty = dirty_col in runs and (runs[dirty_col].astype(str) == "true").any()
    sha = ", ".join(shas) or "unknown"
    rows.append(("code", sha + (" (uncommitted changes in some runs)" if dirty else "")))
    gpu, cpu = float(table["gpu_hours"].sum()), float(table["cpu_hours"].sum())
    used = [f"{gpu:.2f} GPU-hours" if gpu else "", f"{cpu:.2f} CPU-hours" if cpu else ""]
    rows.append(("compute used", " + ".join(u for u in used if u) or "—"))
    if manifest:
        s = manifest.get("search", {})
        rows.append(
            (
                "search",
                f"{s.get('n_trials')} trials per cell ({s.get('sampler')} sampler, "
                f"{s.get('pruner')} pruner), {s.get('confirm_seeds')} confirm seeds, "
                f"budget {s.get('budget_hours') or 'none'} device-hours",
            )
        )
    for note in ended:
        rows.append(("budget", note))
    rows.append(("runs", f"{len(runs)} MLflow runs read"))
    body = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in rows)
    return f'<dl class="facts">{body}</dl>'


# ---- per-cell search diagnostics, from the sweep's Optuna studies ----------------------------


def search_diagnostics(manifest: dict, sweep_dir: Path) -> list[dict]:
    import optuna

    from bln_sweeps.sweep.budget import budget_ended
    from bln_sweeps.sweep.space import open_storage, parse_space, study_names

    storage = open_storage(manifest["storage_url"], sweep_dir)
    out = []
    for cell in manifest["cells"]:
        search_name, _ = study_names(manifest["sweep"], cell["name"])
        try:
            study = optuna.load_study(study_name=search_name, storage=storage)
        except KeyError:  # a cell never created (the sweep was interrupted while preparing)
            continue
        trials = study.get_trials(deepcopy=False)
        space = parse_space(cell.get("space", {}))
        states = pd.Series([t.state.name for t in trials]).value_counts().to_dict()
        summary = (
            f"{len(trials)} trials: {states.get('COMPLETE', 0)} complete, "
            f"{states.get('PRUNED', 0)} pruned, {states.get('FAIL', 0)} failed"
        )
        complete = [t for t in trials if t.state.name == "COMPLETE"]
        best = min(complete, key=lambda t: t.value) if complete else None
        notes = [edge_note(k, d, best.params[k]) for k, d in space.items() if best] if best else []
        out.append(
            {
                "name": cell["name"],
                "summary": summary,
                "notes": [n for n in notes if n],
                "budget_ended": budget_ended(study),
                "png": cell_figure(trials, space, best) if trials else None,
            }
        )
    return out


def _edges(dist) -> tuple[float, float] | None:
    if not hasattr(dist, "low"):
        return None  # categorical: no range to be on the edge of
    return float(dist.low), float(dist.high)


def _frac(dist, x: float) -> float:
    """Where x sits in the range, 0..1, on the distribution's own (log or linear) scale."""
    low, high = _edges(dist)
    if getattr(dist, "log", False):
        return (math.log(x) - math.log(low)) / (math.log(high) - math.log(low))
    return (x - low) / (high - low)


def edge_note(key: str, dist, value) -> str | None:
    if _edges(dist) is None or _edges(dist)[0] == _edges(dist)[1]:
        return None
    f = _frac(dist, float(value))
    if 0.1 <= f <= 0.9:
        return None
    side = "lower" if f < 0.1 else "upper"
    return f"best {key}={value:.4g} is in the {side} tenth of its range: widen it and search on"


def cell_figure(trials, space: dict, best) -> bytes:
    """A cell's search as a PNG: the objective against each searched key (the range's edges and
    their inner tenths shaded), then the optimization history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(space)
    fig, axs = plt.subplots(1, len(keys) + 1, figsize=(4.2 * (len(keys) + 1), 3.2), squeeze=False)
    axs = axs[0]
    for ax, key in zip(axs, keys, strict=False):
        _plot_key(ax, key, space[key], trials, best)
    _plot_history(axs[-1], trials)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _shown(t) -> float | None:
    """A trial's objective, or a pruned trial's last reported value."""
    if t.state.name == "COMPLETE":
        return t.value
    if t.state.name == "PRUNED" and t.intermediate_values:
        return t.intermediate_values[max(t.intermediate_values)]
    return None


def _plot_key(ax, key: str, dist, trials, best) -> None:
    """The objective of every complete and pruned trial against `key`, the best trial starred."""
    for state, marker, color in (("COMPLETE", "o", "C0"), ("PRUNED", "x", "C3")):
        pts = [
            (t.params[key], _shown(t))
            for t in trials
            if t.state.name == state and key in t.params and _shown(t) is not None
        ]
        if pts:
            label = "complete" if state == "COMPLETE" else "pruned"
            ax.scatter(*zip(*pts, strict=True), marker=marker, color=color, label=label)
    _shade_edges(ax, dist)
    if best is not None and key in best.params:
        ax.scatter(
            [best.params[key]],
            [best.value],
            marker="*",
            s=200,
            color="gold",
            edgecolor="k",
            zorder=5,
            label="best",
        )
    ax.set_xlabel(key)
    ax.set_ylabel("objective")
    ax.legend(fontsize=8)


def _shade_edges(ax, dist) -> None:
    """The range's edges as dashed lines, its first and last tenth (log-scaled if the range is)
    shaded: a best value there is at the edge."""
    edges = _edges(dist)
    if edges is None:
        return
    low, high = edges
    if getattr(dist, "log", False):
        ax.set_xscale("log")
        lo10 = math.exp(math.log(low) + 0.1 * (math.log(high) - math.log(low)))
        hi10 = math.exp(math.log(high) - 0.1 * (math.log(high) - math.log(low)))
    else:
        lo10, hi10 = low + 0.1 * (high - low), high - 0.1 * (high - low)
    for x in (low, high):
        ax.axvline(x, ls="--", color="0.4", lw=1)
    ax.axvspan(low, lo10, color="0.9", zorder=0)
    ax.axvspan(hi10, high, color="0.9", zorder=0)


def _plot_history(ax, trials) -> None:
    """The objective by trial number, and the best complete value so far as a step line."""
    for state, marker, color in (("COMPLETE", "o", "C0"), ("PRUNED", "x", "C3")):
        pts = [(t.number, _shown(t)) for t in trials if t.state.name == state and _shown(t)]
        if pts:
            ax.scatter(*zip(*pts, strict=True), marker=marker, color=color, label=state.lower())
    done = sorted((t.number, t.value) for t in trials if t.state.name == "COMPLETE")
    if done:
        xs, ys, best_so_far = [], [], math.inf
        for n, v in done:
            best_so_far = min(best_so_far, v)
            xs.append(n)
            ys.append(best_so_far)
        ax.step(xs, ys, where="post", color="k", lw=1, label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("objective")
    ax.set_title("optimization history")
    ax.legend(fontsize=8)
