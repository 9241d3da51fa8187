"""A comparison table -> Markdown, CSV, LaTeX (booktabs), HTML or JSON.

CSV and JSON carry the full numeric table, exactly (they parse back to the same numbers). The
Markdown, LaTeX and HTML views are for reading: the headline metric as `mean ± CI half-width`,
Δ vs the baseline with its CI, p-values with the test used, leaky norms marked †, a best
trial whose searched value lies at an edge of its range marked ‡, the best value of each column
in bold, then the norm × batch-size and norm × sequence-length pivots.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.contract import BATCH, NORM, SEQ, AnalysisError
from bln_sweeps.tracking.contract import CONFIRM, TEST_LOSS, VAL_LOSS

FORMATS = ("md", "csv", "tex", "html", "json")
LEAKY_MARK = "†"
LEAKY_NOTE = (
    f"{LEAKY_MARK} leaky: in training, this norm's batch statistics see future tokens, as the "
    "run's leak probe measured (MLflow tag leaky=true), which the model can learn to exploit; "
    "read its numbers with care."
)
EDGE_MARK = "‡"
EDGE_NOTE = (
    f"{EDGE_MARK} at edge: the best value of a searched parameter lies in the outer tenth of its "
    "range (column at_edge), so the cell's optimum may lie outside it; widen the range "
    "(bln-sweep prints the override; search.expand_edges=true does it) before reading its Δ."
)
AXIS_LABELS = {NORM: "norm", BATCH: "batch", SEQ: "seq"}
PIVOT_AXES = (BATCH, SEQ)


def check_formats(formats: list[str]) -> list[str]:
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise AnalysisError(f"unknown format {bad[0]!r}; formats: {', '.join(FORMATS)}")
    return formats


def render(table: pd.DataFrame, fmt: str, title: str | None = None) -> str:
    """The table (and for md/tex/html its pivot views) as text in format `fmt`."""
    check_formats([fmt])
    if fmt == "csv":
        return table.to_csv(index=False)
    if fmt == "json":
        return to_json(table)
    views = [(title or _title(table), *display(table))]
    for axis in PIVOT_AXES:
        if axis in table.attrs.get("axes", []) and table[axis].nunique() > 1:
            metric = table.attrs.get("metric", "metric")
            label = "micro-batch size" if axis == BATCH else "sequence length"
            views.append((f"{metric}: norm × {label}", *pivot_display(table, axis)))
    note = LEAKY_NOTE if "leaky" in table and table["leaky"].fillna(False).any() else None
    if _edges(table).any():
        note = f"{note}\n\n{EDGE_NOTE}" if note else EDGE_NOTE
    return {"md": _markdown, "tex": _latex, "html": _html}[fmt](views, note)


def write(
    table: pd.DataFrame, formats: list[str], out_dir: Path, stem: str, title: str | None = None
) -> list[Path]:
    """`<out_dir>/<stem>.<ext>` per format; CSV also gets one file per pivot view."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in check_formats(formats):
        path = out_dir / f"{stem}.{fmt}"
        path.write_text(render(table, fmt, title))
        paths.append(path)
        if fmt == "csv":
            for axis in PIVOT_AXES:
                if axis in table.attrs.get("axes", []):
                    from analysis.tables import pivot

                    p = out_dir / f"{stem}_by_{axis.split('.')[0]}.csv"
                    pivot(table, axis).to_csv(p)
                    paths.append(p)
    return paths


def to_json(table: pd.DataFrame) -> str:
    """{"meta": table.attrs, "rows": [one object per row]}; floats written exactly (repr),
    missing values as null."""
    rows = [
        {k: _json_value(v) for k, v in rec.items()}
        for rec in table.astype(object).to_dict(orient="records")
    ]
    meta = {k: _json_value(v) for k, v in table.attrs.items()}
    return json.dumps({"meta": meta, "rows": rows}, indent=1, allow_nan=False) + "\n"


def _json_value(v):
    if isinstance(v, list | tuple):
        return [_json_value(x) for x in v]
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and math.isinf(v):
        return str(v)
    if isinstance(v, pd.Timestamp):
        return v.isoformat()
    return v


# ---------------------------------------------------------------------------------------------
# The reading view


def display(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(text, bold): the table formatted for reading, and where the best value of each
    column is (lowest loss and Δ, highest throughput)."""
    cols: dict[str, list] = {}  # label -> one text per row, in reading order
    best: dict[str, pd.Series] = {}  # label -> which rows to bold
    _axis_columns(table, cols)
    _metric_columns(table, cols, best)
    _mode_columns(table, cols, best)
    _run_columns(table, cols, best)
    text = pd.DataFrame(cols)
    bold = pd.DataFrame(False, index=text.index, columns=text.columns)
    for c, mask in best.items():
        bold[c] = mask.to_numpy()
    return text, bold


def _axis_columns(table: pd.DataFrame, cols: dict) -> None:
    """The cell's axes (a leaky norm marked) and its rank."""
    axes = table.attrs.get("axes", [c for c in (NORM, BATCH, SEQ) if c in table])
    for axis in axes:
        label = AXIS_LABELS.get(axis, axis)
        values = [_text(v) for v in table[axis]]
        if axis == NORM and "leaky" in table:
            values = [
                v + (f" {LEAKY_MARK}" if lk else "")
                for v, lk in zip(values, table.leaky, strict=True)
            ]
        cols[label] = values
    cols["rank"] = [_text(v) for v in table["rank"]]


def _metric_columns(table: pd.DataFrame, cols: dict, best: dict) -> None:
    """The headline metric (mean ± CI), its seeds, and Δ vs the baseline with both p-values."""
    a = table.attrs
    metric, baseline = a.get("metric", "metric"), a.get("baseline")
    maximize = a.get("higher_is_better", False)
    pct = f"{round(100 * a.get('confidence', 0.95))}%"
    head = f"{metric} (mean ± {pct} CI)"
    cols[head] = [_pm(m, m - lo) for m, lo in zip(table["mean"], table["ci_low"], strict=True)]
    best[head] = _best(table["mean"], maximize)
    cols["seeds"] = [
        f"{n}/{r}" for n, r in zip(table["n_seeds"], table["n_replicates"], strict=True)
    ]
    if baseline is not None:
        dh = f"Δ vs {baseline} [{pct} CI]"
        cols[dh] = [_delta(r) for r in table.itertuples()]
        # best Δ: only where it beats the baseline itself (Δ = 0)
        best[dh] = _best(table["delta"], maximize, also=0.0)
        cols["p (test)"] = [
            f"{_g(p)} ({t})" if np.isfinite(p) else "—"
            for p, t in zip(table["p_value"], table["test"], strict=True)
        ]
        cols["p Holm"] = [
            f"{_g(p)}{' *' if s is not pd.NA and s else ''}" if np.isfinite(p) else "—"
            for p, s in zip(table["p_holm"], table["significant"], strict=True)
        ]


def _mode_columns(table: pd.DataFrame, cols: dict, best: dict) -> None:
    """Every held-out loss (inference mode), the batch − population gap, and the best trial."""
    for m in [c for c in table.columns if c.startswith((VAL_LOSS, TEST_LOSS))]:
        cols[m] = [_f(v) for v in table[m]]
        best[m] = _best(table[m], False)
    if "batch_gap" in table:
        cols["batch − pop. gap"] = [_f(v) for v in table["batch_gap"]]
    if table["best_params"].notna().any():
        at_edge = _edges(table)
        cols["best trial"] = [
            "—" if not isinstance(p, str) else f"{p} ({_f(v)})" + (f" {EDGE_MARK}" if e else "")
            for p, v, e in zip(table["best_params"], table["best_value"], at_edge, strict=True)
        ]


def _run_columns(table: pd.DataFrame, cols: dict, best: dict) -> None:
    """Run counts by outcome, compute spent, and throughput."""
    cols["runs ok/pruned/div/failed"] = [
        f"{r.n_finished}/{r.n_pruned}/{r.n_diverged}/{r.n_failed}" for r in table.itertuples()
    ]
    if table["n_running"].sum():
        cols["running"] = [str(n) for n in table["n_running"]]
    for col, label in (("gpu_hours", "GPU-h"), ("cpu_hours", "CPU-h")):
        if table[col].sum() > 0:
            cols[label] = [f"{h:.2f}" if h >= 0.01 or h == 0 else f"{h:.1g}" for h in table[col]]
    if table["tokens_per_s"].notna().any():
        cols["tokens/s"] = [_thousands(v) for v in table["tokens_per_s"]]
        best["tokens/s"] = _best(table["tokens_per_s"], True)


def pivot_display(table: pd.DataFrame, axis: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows: the other axes; columns: the values of `axis`; cells: mean ± CI half-width, the
    best of each column in bold."""
    from analysis.tables import pivot

    mean = pivot(table, axis, "mean")
    low = pivot(table, axis, "ci_low")
    maximize = table.attrs.get("higher_is_better", False)
    leaky = {
        _text(n)
        for n, lk in zip(table[NORM], table.get("leaky", [False] * len(table)), strict=True)
        if lk
    }
    index = mean.index.to_frame(index=False)
    text = pd.DataFrame(
        {
            AXIS_LABELS.get(c, c): [
                _text(v) + (f" {LEAKY_MARK}" if c == NORM and _text(v) in leaky else "")
                for v in index[c]
            ]
            for c in index.columns
        }
    )
    bold = pd.DataFrame(False, index=text.index, columns=text.columns)
    label = AXIS_LABELS.get(axis, axis)
    for v in mean.columns:
        col = f"{label} {_text(v)}"
        text[col] = [_pm(m, m - lo) for m, lo in zip(mean[v], low[v], strict=True)]
        bold[col] = _best(mean[v].reset_index(drop=True), maximize).to_numpy()
    return text, bold


def _title(table: pd.DataFrame) -> str:
    a = table.attrs
    metric, baseline = a.get("metric", "metric"), a.get("baseline")
    pct = f"{round(100 * a.get('confidence', 0.95))}%"
    seeds = "confirm runs" if a.get("replicates") == CONFIRM else "runs"
    text = f"{metric}: mean ± {pct} t-interval over the seeds of each cell's {seeds}"
    if baseline is not None:
        family = (
            "within each regime"
            if a.get("holm_family") == "regime"
            else "over all comparisons of the table"
        )
        text += (
            f"; Δ vs {baseline} in the same regime, Welch or seed-paired t-test, "
            f"Holm-adjusted p {family} (* < {a.get('alpha', 0.05)})"
        )
    return text


def _edges(table: pd.DataFrame) -> pd.Series:
    """Rows whose best trial has a searched value at an edge of its range."""
    if "at_edge" not in table:
        return pd.Series(False, index=table.index)
    return table["at_edge"].fillna("").astype(str) != ""


def _best(values: pd.Series, maximize: bool, also: float | None = None) -> pd.Series:
    """Where the best value is; `also` competes without being marked (the baseline's Δ)."""
    v = pd.to_numeric(values, errors="coerce").astype(float)
    if not np.isfinite(v).any():
        return pd.Series(False, index=values.index)
    target = v.max() if maximize else v.min()
    if also is not None:
        target = max(target, also) if maximize else min(target, also)
    return (v == target).reset_index(drop=True).set_axis(values.index)


def _delta(r) -> str:
    if r.test == "baseline":
        return "baseline"
    if not np.isfinite(r.delta):
        return "—"
    if not np.isfinite(r.delta_ci_low):
        return _f(r.delta, sign=True)
    return (
        f"{_f(r.delta, sign=True)} [{_f(r.delta_ci_low, sign=True)}, {_f(r.delta_ci_high, True)}]"
    )


def _pm(mean: float, half: float) -> str:
    if not np.isfinite(mean):
        return "—"
    return _f(mean) if not np.isfinite(half) else f"{_f(mean)} ± {_f(half)}"


def _f(v, sign: bool = False) -> str:
    if v is None or v is pd.NA or not np.isfinite(v):
        return "—"
    return f"{v:+.4f}" if sign else f"{v:.4f}"


def _g(p: float) -> str:
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def _thousands(v) -> str:
    return "—" if not np.isfinite(v) else f"{v:,.0f}"


def _text(v) -> str:
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, float | np.floating):
        return f"{v:.6g}"
    return str(v)


# ---------------------------------------------------------------------------------------------
# Writers


def _markdown(views, note) -> str:
    out = []
    for title, text, bold in views:
        out += [f"**{title}**", ""]
        cells = text.mask(bold, "**" + text + "**")
        out.append("| " + " | ".join(_md(c) for c in text.columns) + " |")
        out.append("|" + "|".join("---" if c in _LEFT else "---:" for c in text.columns) + "|")
        out += ["| " + " | ".join(_md(v) for v in row) + " |" for row in cells.to_numpy()]
        out.append("")
    if note:
        out += [note, ""]
    return "\n".join(out)


_LEFT = {"norm", "best trial", "p (test)"}


def _md(s: str) -> str:
    return str(s).replace("|", "\\|")


_TEX = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
    "Δ": r"$\Delta$",
    "−": "-",
    "—": "--",
    "×": r"$\times$",
    LEAKY_MARK: r"$^\dagger$",
    EDGE_MARK: r"$^\ddagger$",
}


def _tex(s: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(s))


def _latex(views, note) -> str:
    out = ["% requires \\usepackage{booktabs}"]
    for title, text, bold in views:
        spec = "".join("l" if c in _LEFT else "r" for c in text.columns)
        out += [f"% {title}", f"\\begin{{tabular}}{{{spec}}}", "\\toprule"]
        out.append(" & ".join(_tex(c) for c in text.columns) + r" \\")
        out.append("\\midrule")
        for row, marks in zip(text.to_numpy(), bold.to_numpy(), strict=True):
            cells = [
                f"\\textbf{{{_tex(v)}}}" if b else _tex(v) for v, b in zip(row, marks, strict=True)
            ]
            out.append(" & ".join(cells) + r" \\")
        out += ["\\bottomrule", "\\end{tabular}", ""]
    if note:
        out += [f"% {line}" for line in note.splitlines() if line]
    return "\n".join(out) + "\n"


def _html(views, note) -> str:
    out = []
    for title, text, bold in views:
        out += [f"<h3>{html.escape(title)}</h3>", "<table>", "<thead><tr>"]
        out += [f"<th>{html.escape(c)}</th>" for c in text.columns]
        out += ["</tr></thead>", "<tbody>"]
        for row, marks in zip(text.to_numpy(), bold.to_numpy(), strict=True):
            cells = [
                f"<td><b>{html.escape(v)}</b></td>" if b else f"<td>{html.escape(v)}</td>"
                for v, b in zip(row, marks, strict=True)
            ]
            out.append("<tr>" + "".join(cells) + "</tr>")
        out += ["</tbody>", "</table>"]
    if note:
        out += [f"<p>{html.escape(para)}</p>" for para in note.split("\n\n")]
    return "\n".join(out) + "\n"
