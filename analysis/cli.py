"""bln-analyze: a sweep's MLflow runs -> ranked comparison tables (and figures).

    bln-analyze default                                  # Markdown table of sweeps/default
    bln-analyze big --metric val/loss@batch --format md,csv,tex --out reports/big --plots
    bln-analyze --experiment bln-train --filter "params.\\"seq.len\\" = '1024'"
    bln-analyze big --report big.html                    # one self-contained page to share

Bad input (unknown sweep or experiment, a metric no run has, a baseline norm not in the sweep,
an empty selection, an unknown format) is one line on stderr naming what exists, exit code 2.
Nothing heavy is imported before the arguments are read, so --help is instant on a login node.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

PROG = "bln-analyze"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints the usage too)
        fail(f"{message}; see {PROG} --help")


def fail(message: str, code: int = 2):
    from bln_sweeps.credentials import mask_text

    print(f"{PROG}: error: {mask_text(message)}", file=sys.stderr)  # no URL password
    sys.exit(code)


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Ranked comparison tables of a sweep's runs: mean ± CI over seeds, Δ vs a "
        "baseline norm with Welch/paired t-tests and Holm's correction, exports and plots.",
    )
    p.add_argument("sweep", nargs="?", help="sweep name (= its MLflow experiment)")
    p.add_argument("--experiment", help="an MLflow experiment instead of a sweep, e.g. bln-train")
    p.add_argument("--filter", default="", help="MLflow search filter, e.g. \"tags.kind='single'\"")
    p.add_argument(
        "--tracking-uri",
        help="MLflow store; default: the sweep's (sweeps/<name>/manifest.json), else "
        "MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db",
    )
    p.add_argument("--sweeps-dir", default="sweeps", help="where bln-sweep keeps sweeps")
    p.add_argument(
        "--metric",
        help="headline metric (default test/loss, the held-out split, where the runs logged it;"
        " else val/loss; test/loss@batch and test/loss:batch both work)",
    )
    p.add_argument(
        "--holm-family",
        default="all",
        choices=["all", "regime"],
        help="Holm's correction over every comparison of the table (all, default) or within"
        " each batch/seq regime; the caption says which",
    )
    p.add_argument("--baseline", default="layernorm", help="norm to compare with, or 'none'")
    p.add_argument("--axes", help="cell axes, comma-separated (default: found from the runs)")
    p.add_argument("--format", default="md", help="md,csv,tex,html,json (comma-separated)")
    p.add_argument("--out", help="write <out>/<name>.<format> (and figures) instead of stdout")
    p.add_argument("--plots", action="store_true", help="also write PNG and SVG figures")
    p.add_argument(
        "--report",
        metavar="FILE.html",
        help="one self-contained HTML page: ranked table, pivots, figures, per-cell search "
        "diagnostics, the sweep's command, code SHA and compute used",
    )
    p.add_argument(
        "--via",
        default="auto",
        choices=["auto", "sql", "client"],
        help="read the store's tables (sql) or page through MlflowClient.search_runs (client)",
    )
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    from analysis.contract import AnalysisError

    try:
        code = run(args)
    except AnalysisError as e:
        fail(str(e))
    sys.exit(code)


def run(args: argparse.Namespace) -> int:
    from analysis.contract import AnalysisError
    from analysis.export import check_formats, render, write
    from analysis.load import load_runs
    from bln_sweeps.tracking.contract import logical_metric_name

    if bool(args.sweep) == bool(args.experiment):
        known = _known_sweeps(args.sweeps_dir)
        raise AnalysisError(f"give a sweep name or --experiment NAME, one of them ({known})")
    formats = check_formats([f.strip() for f in args.format.split(",") if f.strip()])
    if not formats:  # `--format ''` would print nothing and exit 0
        raise AnalysisError(f"--format {args.format!r} names no format; give md,csv,tex,html,json")
    if args.out:
        _check_out(args.out)
    if args.report:
        _check_report_path(Path(args.report))
    name = args.sweep or args.experiment
    uri, sweep_dir = _store(args)
    _check_server(uri)
    try:
        runs = load_runs(name, uri, args.filter, via=args.via)
    except AnalysisError as e:
        if args.sweep and sweep_dir is None and str(e).startswith("no "):
            raise AnalysisError(f"no sweep {name!r}: {_known_sweeps(args.sweeps_dir)}; {e}") from e
        raise
    except Exception as e:  # a damaged store (not a database, a missing table): one line
        first = (str(e).strip().splitlines() or [""])[0]
        raise AnalysisError(
            f"tracking store {uri} cannot be read: {type(e).__name__}: {first}"
        ) from None
    if runs.empty:
        where = f" match filter {args.filter!r}" if args.filter else ""
        raise AnalysisError(f"no runs in experiment {name!r}{where} ({uri})")

    from analysis.tables import comparison_table

    baseline = None if args.baseline.lower() == "none" else args.baseline
    axes = [a.strip() for a in args.axes.split(",")] if args.axes else None
    metric = logical_metric_name(args.metric) if args.metric else _default_metric(runs)
    table = comparison_table(runs, metric, baseline, axes=axes, holm_family=args.holm_family)
    if args.out:
        for path in write(table, formats, Path(args.out), stem=name):
            print(path, file=sys.stderr)
    else:
        print("\n".join(render(table, fmt) for fmt in formats), end="")
    if args.plots:
        out = Path(args.out) if args.out else None
        out = out or (sweep_dir / "figures" if sweep_dir else Path(f"{name}-figures"))
        for path in _plots(table, runs, uri, out, args.via):
            print(path, file=sys.stderr)
    if args.report:
        print(
            _report(Path(args.report), name, table, runs, uri, sweep_dir, args.via), file=sys.stderr
        )
    return 0


def _default_metric(runs) -> str:
    """test/loss (the held-out split selection never read) when any run logged it; runs from
    before the split existed only have val/loss."""
    from analysis.contract import HEADLINE_METRIC, TEST_METRIC

    logged = TEST_METRIC in runs and runs[TEST_METRIC].notna().any()
    return TEST_METRIC if logged else HEADLINE_METRIC


def _check_out(out: str) -> None:
    """--out must be a directory this process can write (a file on its way is one line)."""
    from analysis.contract import AnalysisError
    from bln_sweeps.config import ConfigError
    from bln_sweeps.names import check_dir

    try:
        check_dir("--out", out)
    except ConfigError as e:
        raise AnalysisError(str(e)) from None


def _check_server(uri: str) -> None:
    """A tracking server that does not answer is one line within seconds, not minutes of the
    client's retries."""
    from analysis.contract import AnalysisError
    from bln_sweeps.tracking import check_server

    try:
        check_server(uri)
    except ValueError as e:
        raise AnalysisError(f"--tracking-uri: {e}") from None


def _check_report_path(path: Path) -> None:
    """Before anything is read or written: the page must go into a directory that exists."""
    from analysis.contract import AnalysisError

    if path.is_dir():
        raise AnalysisError(
            f"--report {path}: a directory; give a file name, e.g. {path}/report.html"
        )
    if not path.parent.is_dir():
        raise AnalysisError(f"--report {path}: directory {path.parent} does not exist")


def _report(path: Path, name: str, table, runs, uri: str, sweep_dir: Path | None, via: str):
    """The figures of --plots, made in a temporary directory and embedded in one HTML file."""
    import tempfile

    from analysis.report import build
    from bln_sweeps.sweep.manifest import load_manifest

    # real URLs: the Optuna storage is opened with them (the page shows only the masked command)
    manifest = load_manifest(sweep_dir).to_json() if sweep_dir else None
    with tempfile.TemporaryDirectory() as tmp:
        figures = _plots(table, runs, uri, Path(tmp), via)
        page = build(name, table, runs, figures, manifest, sweep_dir)
    path.write_text(page, encoding="utf-8")
    return path


def _store(args) -> tuple[str, Path | None]:
    """The tracking URI, and the sweep directory when the sweep's manifest was found."""
    sweep_dir = Path(args.sweeps_dir) / args.sweep if args.sweep else None
    manifest = sweep_dir / "manifest.json" if sweep_dir else None
    if manifest is None or not manifest.is_file():
        sweep_dir = None
    if args.tracking_uri:
        from analysis.contract import AnalysisError
        from bln_sweeps.tracking import resolve_tracking_uri

        try:  # the same rules every writer of a store follows
            return resolve_tracking_uri(args.tracking_uri, Path.cwd()), sweep_dir
        except ValueError as e:
            raise AnalysisError(f"--tracking-uri: {e}") from None
    if sweep_dir is not None:
        from analysis.contract import AnalysisError
        from bln_sweeps.sweep.manifest import load_manifest  # real URL (the file is masked)

        try:
            return load_manifest(sweep_dir)["tracking_uri"], sweep_dir
        except (ValueError, KeyError) as e:
            raise AnalysisError(f"{manifest} is not a sweep manifest ({e}); remove it") from None
    from analysis.load import default_tracking_uri

    return default_tracking_uri(), None


def _known_sweeps(sweeps_dir: str) -> str:
    root = Path(sweeps_dir)
    known = sorted(p.parent.name for p in root.glob("*/manifest.json"))
    return f"sweeps in {root}{os.sep}: {', '.join(known) or 'none'}"


def _plots(table, runs, uri: str, out: Path, via: str) -> list[Path]:
    from analysis.contract import HEADLINE_METRIC
    from analysis.load import load_history
    from analysis.plots import plot_all
    from bln_sweeps.tracking.contract import FINISHED, KIND_TAG, SINGLE, STATUS_TAG

    metric = table.attrs["metric"]
    # learning curves: the selection split (the test split is scored once, at the end)
    curve = metric if metric.startswith("val/") else HEADLINE_METRIC
    kind = runs[KIND_TAG].fillna(SINGLE) if KIND_TAG in runs else None
    chosen = runs if kind is None else runs[kind == table.attrs["replicates"]]
    if STATUS_TAG in chosen:
        chosen = chosen[chosen[STATUS_TAG].fillna(FINISHED) == FINISHED]
    history = load_history(chosen["run_id"].tolist(), curve, uri, via=via)
    axes = [a for a in table.attrs["axes"] if a in runs]
    history = history.merge(runs[["run_id", *axes]], on="run_id", how="left")
    history.attrs["metric"] = curve
    return plot_all(table, out, history)
