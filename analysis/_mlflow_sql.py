"""MLflow's SQL tables, read directly: the only module of analysis that knows their names and
columns (runs, tags, params, latest_metrics, metrics, experiments; see
mlflow/store/tracking/dbmodels). Reading them is ~10x faster than `MlflowClient.search_runs`
(BENCHMARKS.md); analysis.load turns the rows into its frame.

    with connect(uri) as con:
        exps = experiments(con)
        runs, params, tags, metrics = run_tables(con, exps[0].experiment_id)
"""

from __future__ import annotations

import sqlite3
from contextlib import closing, contextmanager
from pathlib import Path
from types import SimpleNamespace

from analysis.contract import AnalysisError
from bln_sweeps.tracking.uri import sqlite_database

# Columns, in order, of the rows `run_tables` returns.
RUN_COLUMNS = (
    "run_id",
    "run_name",
    "experiment_id",
    "mlflow_status",
    "start_time",
    "end_time",
    "user_id",
    "artifact_uri",
    "lifecycle_stage",
)
KV_COLUMNS = ("run_id", "key", "value")
METRIC_COLUMNS = (*KV_COLUMNS, "is_nan")  # latest value; MLflow stores NaN as is_nan = 1
HISTORY_COLUMNS = ("run_id", "step", "timestamp", "value", "is_nan")

_RUNS_SQL = (
    "SELECT run_uuid, name, experiment_id, status, start_time, end_time, user_id, artifact_uri, "
    "lifecycle_stage FROM runs WHERE experiment_id = :exp AND lifecycle_stage = 'active'"
)
_JOIN = (
    " t JOIN runs r ON r.run_uuid = t.run_uuid "
    "WHERE r.experiment_id = :exp AND r.lifecycle_stage = 'active'"
)
_PARAMS_SQL = "SELECT t.run_uuid, t.key, t.value FROM params" + _JOIN
_TAGS_SQL = "SELECT t.run_uuid, t.key, t.value FROM tags" + _JOIN
_METRICS_SQL = "SELECT t.run_uuid, t.key, t.value, t.is_nan FROM latest_metrics" + _JOIN
_HISTORY_SQL = (
    "SELECT m.run_uuid, m.step, m.timestamp, m.value, m.is_nan FROM metrics m "
    "WHERE m.key = :key AND m.run_uuid IN ({ids})"
)
_HISTORY_CHUNK = 500  # run ids per query: SQLite allows 999 bound parameters in older builds
_EXPERIMENTS_SQL = "SELECT experiment_id, name, lifecycle_stage FROM experiments"


def run_tables(con, experiment_id: str) -> tuple[list[tuple], ...]:
    """(runs, params, tags, latest metrics) rows of the active runs of one experiment, with
    columns RUN_COLUMNS, KV_COLUMNS, KV_COLUMNS and METRIC_COLUMNS."""
    exp = {"exp": int(experiment_id)}
    return tuple(_rows(con, sql, exp) for sql in (_RUNS_SQL, _PARAMS_SQL, _TAGS_SQL, _METRICS_SQL))


def metric_history(con, key: str, run_ids: list[str]) -> list[tuple]:
    """Every logged value of the stored metric `key` for `run_ids`: HISTORY_COLUMNS rows."""
    rows: list[tuple] = []
    for i in range(0, len(run_ids), _HISTORY_CHUNK):
        chunk = list(run_ids[i : i + _HISTORY_CHUNK])
        names = {f"r{j}": r for j, r in enumerate(chunk)}
        ids = ", ".join(f":{n}" for n in names)
        rows += _rows(con, _HISTORY_SQL.format(ids=ids), {"key": key, **names})
    return rows


def experiments(con) -> list[SimpleNamespace]:
    """Active experiments of the store's default workspace (MLflow 3.17 added workspaces)."""
    try:
        rows = _rows(con, _EXPERIMENTS_SQL + " WHERE workspace = 'default'", {})
    except Exception:  # an older schema, without the workspace column
        if not isinstance(con, sqlite3.Connection):
            con.rollback()
        rows = _rows(con, _EXPERIMENTS_SQL, {})
    return [SimpleNamespace(experiment_id=i, name=n) for i, n, stage in rows if stage == "active"]


@contextmanager
def connect(uri: str):
    """A read-only DB-API connection (sqlite3) or SQLAlchemy connection for a database URI."""
    if uri.startswith("sqlite:"):
        path = sqlite_file(uri)
        # mode=ro: never create a store where there is none, never write to one that exists.
        with closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as con:
            yield con
        return
    if uri.startswith("sqlite+"):  # SQLite through a named SQLAlchemy driver
        sqlite_file(uri)
    import sqlalchemy

    engine = sqlalchemy.create_engine(uri)
    try:
        with engine.connect() as con:
            yield con
    finally:
        engine.dispose()


def sqlite_file(uri: str) -> Path:
    """The database file of a sqlite[+driver]:///<path> URI; it must exist (a reader never
    creates a store)."""
    rest = sqlite_database(uri) or ""
    if not rest or rest == ":memory:":
        raise AnalysisError(f"tracking URI {uri!r}: give the SQLite file, sqlite:///<path>")
    path = Path(rest).expanduser().resolve()
    if not path.is_file():
        raise AnalysisError(f"no MLflow store at {path} (tracking URI {uri!r})")
    return path


def _rows(con, sql: str, params: dict) -> list[tuple]:
    if isinstance(con, sqlite3.Connection):
        return con.execute(sql, params).fetchall()
    import sqlalchemy

    return [tuple(r) for r in con.execute(sqlalchemy.text(sql), params)]
