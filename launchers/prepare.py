"""Everything `bln-sweep` does before its workers start: the pre-submit checks, then the sweep's
studies, its MLflow parent runs and its manifest (bln_sweeps.sweep.manifest), the one file the
workers read. Idempotent: running the same command again reuses every study and run id.
"""

import time

from bln_sweeps.config import ConfigError
from bln_sweeps.sweep.manifest import (
    MANIFEST_FILE,
    Cell,
    Job,
    Manifest,
    load_manifest,
    write_manifest,
)
from launchers.plan import Plan, make_plan


def checked_plan(overrides: list[str]) -> Plan:
    """The plan of a command line, after every check that needs neither torch nor a submit:
    names, launcher, storage and tracking. ConfigError on bad input."""
    from launchers.submit import check_launcher

    plan = make_plan(overrides)
    check_names(plan)
    check_launcher(plan.launcher, plan.sweep_dir)
    check_storage(plan.storage_url)
    check_tracking(plan)
    return plan


def check_storage(url: str | None) -> None:
    if not url:
        return
    try:
        import sqlalchemy

        # PostgreSQL and MySQL drivers take a connect timeout; SQLite's does not
        args = {} if url.startswith("sqlite") else {"connect_timeout": 5}
        with sqlalchemy.create_engine(url, connect_args=args).connect():
            pass
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError("storage.url", url, f"cannot connect: {first}") from None


def check_names(plan: Plan) -> None:
    """The sweep's name (a directory, an MLflow experiment, a filter value), its directory and
    its cells' names (filter values), before anything is created."""
    from bln_sweeps.names import check_dir, check_name

    check_name("sweep.name", plan.sweep)
    check_dir("sweep.dir", str(plan.sweep_dir.parent))
    if plan.sweep_dir.exists() and not plan.sweep_dir.is_dir():
        raise ConfigError("sweep.name", plan.sweep, f"{plan.sweep_dir} is a file")
    for cell in plan.cells:
        check_name("cell", cell["name"], path=False)


def check_tracking(plan: Plan) -> None:
    """A tracking server that does not answer is one line now, not minutes of client retries."""
    from bln_sweeps.tracking import check_server

    try:
        check_server(tracking_uri(plan))
    except ValueError as e:
        raise ConfigError("tracking.uri", tracking_uri(plan), str(e)) from None


def check_cells(plan: Plan) -> None:
    """Build each cell's norms once (imports torch; skipped by --dry-run) so a bad norm option
    fails here, not in a worker."""
    from bln_sweeps.cli import check

    for cell in plan.cells:
        check([*plan.base_overrides, *cell["overrides"]], "sweep")


def tracking_uri(plan: Plan) -> str:
    from bln_sweeps.tracking import resolve_tracking_uri
    from launchers.plan import sweep_config

    uri = sweep_config(plan.base_overrides).tracking.uri
    return resolve_tracking_uri(uri, plan.sweep_dir.resolve())


def prepare(plan: Plan, command: str) -> Manifest:
    """Create (or reopen) the sweep directory, its studies and its MLflow parent runs; write the
    manifest workers read. Idempotent: a rerun reuses every id."""
    import optuna

    from bln_sweeps.sweep.space import open_storage, study_names
    from bln_sweeps.tracking.contract import CELL, CELL_TAG, KIND_TAG, SWEEP, mask_credentials
    from launchers.ui import prepare_experiment

    plan.sweep_dir.mkdir(parents=True, exist_ok=True)
    old = Manifest()
    if (plan.sweep_dir / MANIFEST_FILE).exists():
        old = load_manifest(plan.sweep_dir)
    uri = old.tracking_uri or tracking_uri(plan)
    storage = open_storage(plan.storage_url, plan.sweep_dir)
    # a driver killed before it wrote the manifest left its runs behind: adopt them, by tag
    sweep_run = old.mlflow_run_id or unfinished_run(uri, plan.sweep, SWEEP)
    if sweep_run is None:
        sweep_run = start_run(
            uri,
            plan.sweep,
            f"sweep {plan.sweep}",
            {KIND_TAG: SWEEP},
            description=f"`{mask_credentials(command)}`",
        )
    old_runs = {c.name: c.mlflow_run_id for c in old.cells}
    cells = []
    for cell in plan.cells:
        for name in study_names(plan.sweep, cell["name"]):
            optuna.create_study(study_name=name, storage=storage, load_if_exists=True)
        run_id = old_runs.get(cell["name"]) or unfinished_run(uri, plan.sweep, CELL, cell["name"])
        if run_id is None:
            tags = {KIND_TAG: CELL, CELL_TAG: cell["name"]}
            run_id = start_run(uri, plan.sweep, cell["name"], tags, parent_run_id=sweep_run)
        cells.append(Cell(cell["name"], cell["overrides"], cell["space"], run_id))
    prepare_experiment(uri, plan.sweep, plan.search["metric"])  # the UI's saved "bln sweep" view
    manifest = Manifest(
        sweep=plan.sweep,
        command=mask_credentials(command),
        base_overrides=plan.base_overrides,
        base_seed=plan.base_seed,
        cells=cells,
        search=plan.search,
        launcher=plan.launcher,
        storage_url=plan.storage_url,
        tracking_uri=uri,
        mlflow_run_id=sweep_run,
        jobs=old.jobs,
    )
    write_manifest(plan.sweep_dir, manifest)
    return manifest


def start_run(uri: str, sweep: str, name: str, tags: dict, **kwargs) -> str:
    """A new parent run (the sweep's or a cell's), tagged with its sweep; its id."""
    from bln_sweeps.tracking import RunLogger
    from bln_sweeps.tracking.contract import SWEEP_TAG

    logger = RunLogger.start(uri, sweep, run_name=name, tags={SWEEP_TAG: sweep, **tags}, **kwargs)
    return logger.run_id


def unfinished_run(uri: str, sweep: str, kind: str, cell: str | None = None) -> str | None:
    """The id of the sweep's (or a cell's) MLflow run that is still RUNNING, if any."""
    from bln_sweeps.tracking.contract import CELL_TAG, KIND_TAG, SWEEP_TAG
    from bln_sweeps.tracking.runs import running_run

    tags = {KIND_TAG: kind, SWEEP_TAG: sweep, **({CELL_TAG: cell} if cell is not None else {})}
    return running_run(uri, sweep, tags)


def record_jobs(plan: Plan, manifest: Manifest, jobs: list, first: int) -> None:
    """Append the submitted worker jobs to the manifest (a rerun reattaches to live ones)."""
    manifest.jobs += [
        Job(str(j.job_id), plan.launcher["name"], first + i, time.time())
        for i, j in enumerate(jobs)
    ]
    write_manifest(plan.sweep_dir, manifest)
