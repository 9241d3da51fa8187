"""MLflow runs -> one pandas DataFrame, one row per run, params cast to their types.

    runs = load_runs("default", "sqlite:///sweeps/default/mlflow.db")
    runs[["norm.name", "batch.size", "seed", "kind", "status", "val/loss"]]

Two ways in, one frame out. For a database-backed store (`sqlite:`, `postgresql:`, `mysql:`)
the tables MLflow keeps are read with four SQL queries (analysis._mlflow_sql): 10,000 runs take
about 2 s, where `MlflowClient.search_runs` takes about 25 s and stops at 1000 runs unless one
pages (mlflow#15814, #2730; BENCHMARKS.md).
For a tracking server (`http(s)://`) the client's `search_runs` is paged to the end. A test
checks that both produce the same frame. Deleted runs are left out, as MLflow does; failed,
pruned and diverged runs stay in (their `status` tag says how they ended).

Columns: `run_id`, `run_name`, `experiment_id`, `parent_run_id`, `mlflow_status`, `start_time`,
`end_time`; the contract tags `kind`, `status`, `status_reason`, `sweep`, `cell`, `trial`,
`leaky`, `device`, `n_devices`; every param under its dotted key (`norm.name`, `optim.lr`, cast
to Int64 / float64 / boolean / str, "None" -> missing); every metric under its logical name
(`val/loss@batch`, the last logged value); every other tag as `tags.<key>`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pandas as pd

from analysis import _mlflow_sql as sql
from analysis.contract import TAG_COLUMNS, AnalysisError
from bln_sweeps.tracking.contract import (
    PARENT_TAG,
    RUN_NAME_TAG,
    VAL_LOSS,
    logical_metric_name,
    stored_metric_key,
)
from bln_sweeps.tracking.uri import SQL_SCHEMES, resolve_tracking_uri

INFO_COLUMNS = (
    "run_id",
    "run_name",
    "experiment_id",
    "parent_run_id",
    "mlflow_status",
    "start_time",
    "end_time",
)
RESERVED = frozenset(INFO_COLUMNS) | frozenset(TAG_COLUMNS)
PAGE_SIZE = 10_000  # runs per search_runs request on the client path (MLflow allows 50,000)
VIA = ("auto", "sql", "client")


def default_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the embedded store bln-train writes: ./mlflow.db."""
    return os.environ.get("MLFLOW_TRACKING_URI") or resolve_tracking_uri(None, Path.cwd())


def load_runs(
    experiment: str,
    tracking_uri: str | None = None,
    filter_string: str = "",
    *,
    via: str = "auto",
) -> pd.DataFrame:
    """Every active run of `experiment` (by name) matching `filter_string` (MLflow's search
    grammar, e.g. `tags.kind = 'confirm' and params."norm.name" = 'bln'`), as a DataFrame.

    via: "sql" reads the store's tables directly, "client" pages through
    MlflowClient.search_runs, "auto" picks "sql" for database URIs and "client" otherwise.
    Raises AnalysisError when the store or the experiment does not exist.
    """
    uri = tracking_uri or default_tracking_uri()
    if via not in VIA:
        raise AnalysisError(f"via={via!r}: valid choices: {', '.join(VIA)}")
    if via == "auto":
        via = "sql" if SQL_SCHEMES.match(uri) else "client"
        if via == "sql" and _needs_client(filter_string):
            via = "client"
    raw = (
        _read_sql(uri, experiment) if via == "sql" else _read_client(uri, experiment, filter_string)
    )
    if via == "sql" and filter_string:
        raw = _filter(raw, filter_string)
    df = _frame(raw)
    df.attrs.update(
        tracking_uri=uri,
        experiment=experiment,
        experiment_id=raw.experiment_id,
        filter=filter_string,
    )
    return df


def load_history(
    run_ids: list[str],
    metric: str = VAL_LOSS,
    tracking_uri: str | None = None,
    *,
    via: str = "auto",
) -> pd.DataFrame:
    """The logged values of `metric` for `run_ids` (learning curves): columns run_id, step,
    value. When a step was logged twice (a resumed run), the later value is kept."""
    uri = tracking_uri or default_tracking_uri()
    key = stored_metric_key(metric)
    rows: list[tuple] = []
    if (via == "auto" and SQL_SCHEMES.match(uri)) or via == "sql":
        with sql.connect(uri) as con:
            rows = sql.metric_history(con, key, run_ids)
        rows = [(r, s, t, float("nan") if nan else v) for r, s, t, v, nan in rows]
    else:
        client = _client(uri)
        for run_id in run_ids:
            rows += [
                (run_id, m.step, m.timestamp, m.value)
                for m in client.get_metric_history(run_id, key)
            ]
    hist = pd.DataFrame(rows, columns=["run_id", "step", "timestamp", "value"])
    hist = hist.astype({"step": "int64", "timestamp": "int64", "value": "float64"})
    hist = hist.sort_values(["run_id", "step", "timestamp"], kind="stable")
    hist = hist.drop_duplicates(["run_id", "step"], keep="last")
    return hist.drop(columns="timestamp").reset_index(drop=True)


def experiment_names(tracking_uri: str | None = None) -> list[str]:
    """Names of the active experiments in the store (for error messages)."""
    uri = tracking_uri or default_tracking_uri()
    if SQL_SCHEMES.match(uri):
        with sql.connect(uri) as con:
            return sorted(e.name for e in sql.experiments(con))
    return sorted(e.name for e in _client(uri).search_experiments())


def column_kinds(df: pd.DataFrame) -> dict[str, list[str]]:
    """Which columns of a runs frame are params, metrics and tags (read from their names, so a
    filtered or concatenated frame still works)."""
    kinds: dict[str, list[str]] = {"info": [], "tags": [], "params": [], "metrics": []}
    for c in df.columns:
        if c in INFO_COLUMNS:
            kinds["info"].append(c)
        elif c in TAG_COLUMNS or c.startswith("tags."):
            kinds["tags"].append(c)
        elif "/" in c:
            kinds["metrics"].append(c)
        else:
            kinds["params"].append(c)
    return kinds


# ---------------------------------------------------------------------------------------------
# The store's tables, long form: what both ways of reading produce before the frame is built


@dataclass
class _Raw:
    experiment_id: str
    info: pd.DataFrame  # run_id, run_name, experiment_id, mlflow_status, start_time, end_time,
    #                     user_id, artifact_uri, lifecycle_stage
    params: pd.DataFrame  # run_id, key, value (str)
    tags: pd.DataFrame  # run_id, key, value (str)
    metrics: pd.DataFrame  # run_id, key, value (float; NaN where MLflow stored is_nan)


_INFO = list(sql.RUN_COLUMNS)
_KV = list(sql.KV_COLUMNS)


def _read_sql(uri: str, experiment: str) -> _Raw:
    with sql.connect(uri) as con:
        exps = sql.experiments(con)
        match = [e for e in exps if e.name == experiment]
        if not match:
            raise AnalysisError(_no_experiment(experiment, uri, [e.name for e in exps]))
        runs, params, tags, metrics = sql.run_tables(con, match[0].experiment_id)
    info = pd.DataFrame(runs, columns=_INFO)
    params = pd.DataFrame(params, columns=_KV)
    tags = pd.DataFrame(tags, columns=_KV)
    metrics = pd.DataFrame(metrics, columns=list(sql.METRIC_COLUMNS))
    info["experiment_id"] = info["experiment_id"].astype(str)
    metrics["value"] = metrics["value"].astype("float64").where(~metrics.pop("is_nan").astype(bool))
    return _Raw(
        experiment_id=str(match[0].experiment_id),
        info=info,
        params=params,
        tags=tags,
        metrics=metrics,
    )


def _read_client(uri: str, experiment: str, filter_string: str) -> _Raw:
    from mlflow.entities import ViewType
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None or exp.lifecycle_stage != "active":
        names = [e.name for e in client.search_experiments()]
        raise AnalysisError(_no_experiment(experiment, uri, names))
    runs, token = [], None
    while True:  # search_runs returns one page (1000 runs by default) and a token for the next
        try:
            page = client.search_runs(
                [exp.experiment_id],
                filter_string,
                run_view_type=ViewType.ACTIVE_ONLY,
                max_results=PAGE_SIZE,
                page_token=token,
            )
        except MlflowException as e:
            raise AnalysisError(f"filter {filter_string!r}: {e.message}") from e
        runs.extend(page)
        token = page.token
        if not token:
            break
    i = [r.info for r in runs]
    info = pd.DataFrame(
        [
            (
                r.run_id,
                r.run_name,
                r.experiment_id,
                r.status,
                r.start_time,
                r.end_time,
                r.user_id,
                r.artifact_uri,
                r.lifecycle_stage,
            )
            for r in i
        ],
        columns=_INFO,
    )

    def long(get) -> pd.DataFrame:
        rows = [(r.info.run_id, k, v) for r in runs for k, v in get(r).items()]
        return pd.DataFrame(rows, columns=_KV)

    return _Raw(
        experiment_id=str(exp.experiment_id),
        info=info,
        params=long(lambda r: r.data.params),
        tags=long(lambda r: r.data.tags),
        metrics=long(lambda r: r.data.metrics).astype({"value": "float64"}),
    )


def _filter(raw: _Raw, filter_string: str) -> _Raw:
    """Keep the runs that match `filter_string`, by MLflow's own in-memory search semantics
    (SearchUtils.filter, which its file store used) over the rows already read."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.search_utils import SearchUtils

    runs: dict[str, SimpleNamespace] = {}
    for row in raw.info.itertuples(index=False):
        info = SimpleNamespace(**row._asdict())
        runs[row.run_id] = SimpleNamespace(
            info=info, data=SimpleNamespace(params={}, tags={}, metrics={})
        )
    for part, frame in (("params", raw.params), ("tags", raw.tags), ("metrics", raw.metrics)):
        for run_id, key, value in zip(frame["run_id"], frame["key"], frame["value"], strict=True):
            getattr(runs[run_id].data, part)[key] = value
    for run in runs.values():  # MLflow's entity falls back to the tag for an unnamed run
        run.info.run_name = run.info.run_name or run.data.tags.get(RUN_NAME_TAG)
    try:
        keep = {r.info.run_id for r in SearchUtils.filter(list(runs.values()), filter_string)}
    except MlflowException as e:
        raise AnalysisError(f"filter {filter_string!r}: {e.message}") from e

    def sub(frame: pd.DataFrame) -> pd.DataFrame:
        return frame[frame["run_id"].isin(keep)].reset_index(drop=True)

    return _Raw(
        experiment_id=raw.experiment_id,
        info=sub(raw.info),
        params=sub(raw.params),
        tags=sub(raw.tags),
        metrics=sub(raw.metrics),
    )


def _needs_client(filter_string: str) -> bool:
    """Filters on datasets need the run inputs, which only the client path reads."""
    return bool(re.search(r"\bdatasets?\.", filter_string or ""))


# ---------------------------------------------------------------------------------------------
# Long tables -> the runs frame


def _frame(raw: _Raw) -> pd.DataFrame:
    info = raw.info.set_index("run_id")
    tags = _wide(raw.tags, info.index)
    params = _wide(raw.params, info.index)
    metrics = _wide(raw.metrics, info.index, dtype="float64")

    out = pd.DataFrame(index=info.index)
    name_tag = tags[RUN_NAME_TAG] if RUN_NAME_TAG in tags else pd.Series(None, index=info.index)
    out["run_name"] = info["run_name"].where(info["run_name"].fillna("") != "", name_tag)
    out["experiment_id"] = info["experiment_id"]
    out["parent_run_id"] = tags[PARENT_TAG] if PARENT_TAG in tags else None
    out["mlflow_status"] = info["mlflow_status"]
    for col in ("start_time", "end_time"):
        ms = pd.to_numeric(info[col], errors="coerce").astype("float64")
        out[col] = pd.to_datetime(ms, unit="ms", utc=True)
    for key, dtype in TAG_COLUMNS.items():
        out[key] = _cast_tag(tags[key], dtype) if key in tags else pd.Series(dtype=dtype)
    for key in sorted(params.columns):
        out[f"params.{key}" if key in RESERVED else key] = _cast_param(params[key])
    for key in sorted(metrics.columns, key=logical_metric_name):
        out[logical_metric_name(key)] = metrics[key]
    skip = {PARENT_TAG, RUN_NAME_TAG, *TAG_COLUMNS}
    for key in sorted(k for k in tags.columns if k not in skip):
        out[f"tags.{key}"] = tags[key].astype("str").where(tags[key].notna())
    for col in ("run_name", "experiment_id", "parent_run_id", "mlflow_status"):
        out[col] = out[col].astype("str").where(out[col].notna())
    out = out.reset_index()
    order = out.sort_values(["start_time", "run_id"], kind="stable").index
    return out.loc[order].reset_index(drop=True)


def _wide(long: pd.DataFrame, index: pd.Index, dtype: str = "object") -> pd.DataFrame:
    """(run_id, key, value) rows -> one column per key, one row per run of `index`."""
    if long.empty:
        return pd.DataFrame(index=index)
    values = long["value"] if dtype == "float64" else long["value"].astype(object)
    wide = pd.Series(values.to_numpy(), index=pd.MultiIndex.from_arrays([long.run_id, long.key]))
    wide = wide[~wide.index.duplicated(keep="last")].unstack("key")
    wide.columns.name = None
    return wide.reindex(index).astype(dtype)


_INT = re.compile(r"^[-+]?\d+$")


def _cast_param(col: pd.Series) -> pd.Series:
    """MLflow stores every param as str(value): turn the column back into its type. A column is
    boolean if every value is True/False, Int64 if every value is an integer, float64 if every
    value is a number, else str; "None" (Python's None) becomes missing."""
    col = col.where(col != "None")
    values = [v for v in col.dropna().unique()]
    if values and all(v in ("True", "False") for v in values):
        return col.map({"True": True, "False": False}).astype("boolean")
    if values and all(_INT.match(v) for v in values):
        try:
            return pd.to_numeric(col).astype("Int64")
        except (OverflowError, ValueError):
            pass  # beyond int64: keep it as a float
    if values:
        try:
            parsed = {v: float(v) for v in values}
        except ValueError:
            parsed = None
        if parsed is not None:
            return col.map(parsed).astype("float64")
    return col.astype("str").where(col.notna())


def _cast_tag(col: pd.Series, dtype: str) -> pd.Series:
    if dtype == "boolean":  # leaky: "true"/"false"
        low = col.str.lower()
        return low.map({"true": True, "false": False}).astype("boolean")
    if dtype == "Int64":
        return pd.to_numeric(col, errors="coerce").astype("Int64")
    return col.astype("str").where(col.notna())


# ---------------------------------------------------------------------------------------------
# Connections


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite"):
        sql.sqlite_file(uri)  # MlflowClient would create an empty store
    return MlflowClient(tracking_uri=uri)


def _no_experiment(name: str, uri: str, names: list[str]) -> str:
    known = ", ".join(sorted(names)) or "none"
    return f"no experiment {name!r} in {uri}; experiments: {known}"
