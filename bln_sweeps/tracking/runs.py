"""Reading runs back: every run of an experiment (all pages), a run to resume (by id, or the one
an attempt that died started), and ending the runs still RUNNING (a sweep's parent runs, once no
trial is left).

runs = find_runs(uri, "default", "tags.kind = 'cell'")
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from bln_sweeps.tracking.contract import RUN_FINISHED, RUN_RUNNING
from bln_sweeps.tracking.uri import tracking_client


def find_runs(uri: str, experiment: str, filter_string: str = "", order_by=None) -> list:
    """Every run of `experiment` matching `filter_string` (all pages: MlflowClient.search_runs
    alone stops at 1000 runs without a warning)."""
    client = tracking_client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ValueError(f"experiment {experiment!r} not in {uri}; there are: {', '.join(names)}")
    runs, token = [], None
    while True:
        page = client.search_runs(
            [exp.experiment_id],
            filter_string,
            max_results=1000,
            order_by=order_by,
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def running_run(uri: str, experiment: str, tags: Mapping[str, str]) -> str | None:
    """The id of the newest RUNNING run of `experiment` that has every tag of `tags`, or None:
    how a rerun finds the run an attempt killed before it noted the id made (runs are created
    with their tags, so one that exists can be found). A value the filter grammar cannot quote
    (a run directory's path may hold a quote) is compared here instead."""
    from bln_sweeps.names import filter_string, quotable

    client = tracking_client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    where = {f"tags.{k}": v for k, v in tags.items() if quotable(v)}
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string({**where, "attributes.status": RUN_RUNNING}),
        order_by=["attributes.start_time DESC"],
        max_results=1000,  # RUNNING runs of one experiment with these tags: one, or a few
    )
    mine = (r for r in runs if all(r.data.tags.get(k) == v for k, v in tags.items()))
    return next((r.info.run_id for r in mine), None)


def resume_run(client: Any, run_id: str, uri: str):
    """Run `run_id` of the store, set RUNNING again; ValueError (one line) if it is gone."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise ValueError(f"run_id={run_id!r} to resume is not in the tracking store {uri}") from e
    if run.info.lifecycle_stage != "active":
        raise ValueError(f"run_id={run_id!r} to resume is deleted in {uri}")
    client.update_run(run_id, status=RUN_RUNNING)
    return run


def end_running_runs(uri: str, run_ids: Iterable[str | None]) -> None:
    """End each of `run_ids` that is still RUNNING as FINISHED (None and ended runs are skipped):
    any of a sweep's workers may close its sweep and cell runs, once, whichever comes last."""
    client = tracking_client(uri)
    for run_id in run_ids:
        if run_id and client.get_run(run_id).info.status == RUN_RUNNING:
            client.set_terminated(run_id, RUN_FINISHED)
