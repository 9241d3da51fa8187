"""MLflow runs -> ranked comparison tables with honest statistics, exports and plots.

    from analysis import load_runs, comparison_table
    runs = load_runs("default", "sqlite:///sweeps/default/mlflow.db")
    table = comparison_table(runs, metric="val/loss", baseline="layernorm")

The command line is `bln-analyze` (analysis.cli). Importing this package loads nothing heavy:
pandas and scipy come with the first call, matplotlib only with a plot.
"""

__all__ = ["load_runs", "load_history", "comparison_table", "pivot", "AnalysisError"]

_HOMES = {
    "load_runs": "analysis.load",
    "load_history": "analysis.load",
    "comparison_table": "analysis.tables",
    "pivot": "analysis.tables",
    "AnalysisError": "analysis.contract",
}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'analysis' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_HOMES[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
