"""Progress of a sweep, read from its Optuna studies: per cell, done / running / pruned / failed
and the best value so far. Used by the live view and by `bln-sweep status NAME`."""

import math
from pathlib import Path

from bln_sweeps.sweep.budget import budget_ended, budget_state, expansion_pending, search_budget
from bln_sweeps.sweep.manifest import VIEW_KEYS, load_manifest
from bln_sweeps.sweep.space import open_storage, study_names


def cell_rows(sweep_dir: Path) -> list[dict]:
    import optuna

    m = load_manifest(sweep_dir, require=VIEW_KEYS)
    storage = open_storage(m.storage_url, sweep_dir)
    rows = []
    for cell in m.cells:
        search_name, confirm_name = study_names(m.sweep, cell.name)
        search = optuna.load_study(study_name=search_name, storage=storage)
        confirm = optuna.load_study(study_name=confirm_name, storage=storage)
        s = budget_state(search, search_budget(search, m.search))
        c = budget_state(confirm, m.search["confirm_seeds"])
        ended = budget_ended(search)  # search.budget_hours stopped new trials in this cell
        values = [t.value for t in search.get_trials(deepcopy=False) if t.value is not None]
        rows.append(
            {
                "cell": cell.name,
                "trials": f"{s['done']}/{search_budget(search, m.search)}"
                + (" (budget)" if ended else ""),
                "running": s["running"] + c["running"],
                "complete": s["complete"],
                "pruned": s["pruned"],
                "failed": s["failed"] + c["failed"],
                "best": min(values) if values else math.nan,
                "confirm": f"{c['done']}/{m.search['confirm_seeds']}",
                "ended": ended,
                "finished": (s["left"] <= 0 or bool(ended))
                and not (s["running"] or s["waiting"])
                and not (s["complete"] and expansion_pending(search, m.search))
                and (c["left"] <= 0 or s["complete"] == 0)
                and not (c["running"] or c["waiting"]),
            }
        )
    return rows


def render(rows: list[dict]) -> str:
    cols = ["cell", "trials", "running", "complete", "pruned", "failed", "best", "confirm"]
    cells = [[r[c] if c != "best" else _value(r[c]) for c in cols] for r in rows]
    widths = [max(len(str(x)) for x in [c, *(row[i] for row in cells)]) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))
    body = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)) for row in cells]
    notes = sorted({r["ended"] for r in rows if r.get("ended")})[:1]  # one cap, one line
    return "\n".join([line, *body, *notes])


def _value(v: float) -> str:
    return "—" if math.isnan(v) else f"{v:.4f}"


# ---- the end of a sweep ------------------------------------------------------------------------


def ranked_table(manifest) -> None:
    """The ranked table from the analysis module, in its own process (launchers never import
    analysis)."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "analysis", manifest.sweep]
    # the URI (it may hold a password) goes through the environment, not argv, which `ps` shows
    env = {**os.environ, "MLFLOW_TRACKING_URI": manifest.tracking_uri}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    print(out.stdout if out.returncode == 0 else f"(no table: {out.stderr.strip()})")


def report_edges(sweep_dir: Path) -> None:
    """Cells whose best value of a searched parameter lies at an edge of its range: an
    unfinished comparison, so the sweep says so last, with the override that widens the range."""
    from bln_sweeps.sweep.design import edge_report

    lines = edge_report(sweep_dir)
    for line in lines:
        print(line)
    if not lines:
        print("no best value lies in the outer tenth of its search range")
