"""`bln-sweep`: plan and validate a sweep, create its studies and MLflow runs, submit workers,
then follow them (or `--detach`). Running the same command again resumes the sweep.

usage:
  bln-sweep [OVERRIDES...]            run a sweep: plan, submit the workers, show live progress
  bln-sweep --dry-run [OVERRIDES...]  cells, search spaces, jobs and estimated compute; nothing runs
  bln-sweep --detach [OVERRIDES...]   submit the workers and return
  bln-sweep status NAME [--follow]    progress of a sweep (--follow: live until it ends)
  bln-sweep stop NAME                 stop a sweep's workers; running trials checkpoint and requeue
  bln-sweep ui [NAME] [--port P]      browse a sweep's runs in the MLflow UI
  bln-sweep calibrate [OVERRIDES...]  time a few steps of each cell shape here, for --dry-run's cost

most used overrides:
  norm=layernorm,bln batch=b4,b32 seq=s1024,s4096   grid axes (comma lists): a study per cell
  search=lr_wd search.n_trials=30 search.confirm_seeds=3     search space, trials, fresh seeds
  search.budget_hours=200             no new trial once the sweep has used this many GPU-hours
  sweep.name=big                      the sweep's directory, MLflow experiment and study names
  launcher=slurm launcher.workers=8   where workers run: local | slurm | debug (in-process)
  launcher.assumed_tflops=150         throughput per worker for the cost estimate
  storage=postgres tracking=server    shared stores for a cluster
  +experiment=gpt2_norms              the GPT-2 normalization study (conf/experiment/)

Ctrl-C in the live view detaches: the workers go on; `status NAME --follow` watches again.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bln_sweeps.config import ConfigError
from launchers.plan import Plan, make_plan

USAGE = __doc__.split("\n\n", 1)[1]


def fail(message: str) -> int:
    from bln_sweeps.credentials import mask_text

    print(f"bln-sweep: error: {mask_text(message)}", file=sys.stderr)  # no URL password
    return 2


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


def print_plan(plan: Plan) -> None:
    s = plan.search
    print(f"sweep {plan.sweep!r} in {plan.sweep_dir}")
    print(f"grid axes: {' '.join(plan.axes) or '(none)'}")
    print(
        f"{len(plan.cells)} cells x ({s['n_trials']} trials + {s['confirm_seeds']} confirm seeds)"
        f" = {plan.trial_budget} runs; sampler {s['sampler']}, pruner {s['pruner']}"
    )
    print(search_design(plan))
    spaces = {
        cell["name"]: ", ".join(f"{k}={v}" for k, v in cell["space"].items())
        or "(nothing searched)"
        for cell in plan.cells
    }
    if len(plan.cells) > 1 and len(set(spaces.values())) == 1:  # one line, not one per cell
        print(f"  every cell: {next(iter(spaces.values()))}")
    else:
        for name, space in spaces.items():
            print(f"  {name}: {space}")
    n = plan.launcher["workers"]
    print(
        f"{n} worker job(s) on launcher {plan.launcher['name']!r}"
        f" (timeout {plan.launcher['timeout_min']} min each)"
    )


def search_design(plan: Plan) -> str:
    """The seeds and the start-up budget, stated: what makes the cells comparable."""
    from bln_sweeps.design import confirm_seed, search_seed, startup_trials

    s, base = plan.search, plan.base_seed
    k = s["confirm_seeds"]
    confirm = f"seeds {confirm_seed(base, 0)}..{confirm_seed(base, k - 1)}" if k else "none"
    modelled = s["sampler"] in ("tpe", "gp")
    startup = f", {startup_trials(s)} random start-up trials" if modelled else ""
    return (
        f"search trials train with seed {search_seed(base)}, confirm runs with {confirm};"
        f" one sampler stream per cell (search.seed={s['seed']}){startup}"
    )


def print_cost(plan: Plan, per_cell: bool, uri: str | None = None) -> None:
    """The compute estimate (launchers/cost.py); --dry-run shows it per cell."""
    from launchers.cost import estimate, render

    if uri is None:
        try:
            uri = tracking_uri(plan)
        except ValueError:
            uri = None  # a bad tracking.uri fails later, where the run needs it
    est = estimate(plan, plan.cell_configs, plan.sweeps_dir, uri)
    print("\n".join(render(est, per_cell)))


def calibrate(argv: list[str]) -> int:
    """`bln-sweep calibrate OVERRIDES`: time each distinct cell shape of that sweep on this
    machine (run it on a compute node) and keep the result for --dry-run's estimate."""
    from launchers.cost import calibrate as measure
    from launchers.cost import save_calibration

    if any(a.startswith("--") for a in argv):
        return fail("usage: bln-sweep calibrate [OVERRIDES...] (the sweep's own overrides)")
    try:
        plan = make_plan(argv)
    except ConfigError as e:
        return fail(str(e))
    results = measure(plan, plan.cell_configs)
    for key, r in results.items():
        print(f"{key}: {r['tokens_per_s']:,.0f} tokens/s = {r['flops_per_s'] / 1e12:.3f} TFLOP/s")
    print(f"saved to {save_calibration(plan.sweeps_dir, results)}")
    print_cost(plan, per_cell=False)
    return 0


def tracking_uri(plan: Plan) -> str:
    from bln_sweeps.tracking import resolve_tracking_uri
    from launchers.plan import sweep_config

    uri = sweep_config(plan.base_overrides).tracking.uri
    return resolve_tracking_uri(uri, plan.sweep_dir.resolve())


def prepare(plan: Plan, command: str) -> dict:
    """Create (or reopen) the sweep directory, its studies and its MLflow parent runs; write the
    manifest workers read. Idempotent: a rerun reuses every id."""
    import optuna

    from bln_sweeps.search import load_manifest, open_storage, study_names
    from bln_sweeps.tracking import RunLogger
    from bln_sweeps.tracking.contract import (
        CELL,
        CELL_TAG,
        KIND_TAG,
        SWEEP,
        SWEEP_TAG,
        mask_credentials,
    )

    plan.sweep_dir.mkdir(parents=True, exist_ok=True)
    path = plan.sweep_dir / "manifest.json"
    old = load_manifest(plan.sweep_dir) if path.exists() else {}
    old_cells = {c["name"]: c for c in old.get("cells", [])}
    uri = old.get("tracking_uri") or tracking_uri(plan)
    storage = open_storage(plan.storage_url, plan.sweep_dir)
    # a driver killed before it wrote the manifest left its runs behind: adopt them, by tag
    sweep_run = old.get("mlflow_run_id") or unfinished_run(uri, plan.sweep, SWEEP)
    if sweep_run is None:
        logger = RunLogger.start(
            uri,
            plan.sweep,
            run_name=f"sweep {plan.sweep}",
            tags={SWEEP_TAG: plan.sweep, KIND_TAG: SWEEP},
            description=f"`{mask_credentials(command)}`",
        )
        sweep_run = logger.run_id
    cells = []
    for cell in plan.cells:
        for name in study_names(plan.sweep, cell["name"]):
            optuna.create_study(study_name=name, storage=storage, load_if_exists=True)
        run_id = old_cells.get(cell["name"], {}).get("mlflow_run_id") or unfinished_run(
            uri, plan.sweep, CELL, cell["name"]
        )
        if run_id is None:
            logger = RunLogger.start(
                uri,
                plan.sweep,
                run_name=cell["name"],
                parent_run_id=sweep_run,
                tags={SWEEP_TAG: plan.sweep, KIND_TAG: CELL, CELL_TAG: cell["name"]},
            )
            run_id = logger.run_id
        cells.append({**cell, "mlflow_run_id": run_id})
    from launchers.ui import prepare_experiment

    prepare_experiment(uri, plan.sweep, plan.search["metric"])  # the UI's saved "bln sweep" view
    manifest = {
        "sweep": plan.sweep,
        "command": mask_credentials(command),
        "base_overrides": plan.base_overrides,
        "base_seed": plan.base_seed,
        "cells": cells,
        "search": plan.search,
        "launcher": plan.launcher,
        "storage_url": plan.storage_url,
        "tracking_uri": uri,
        "mlflow_run_id": sweep_run,
        "jobs": old.get("jobs", []),
    }
    write_manifest(plan.sweep_dir, manifest)
    return manifest


def unfinished_run(uri: str, sweep: str, kind: str, cell: str | None = None) -> str | None:
    """The id of the sweep's (or a cell's) MLflow run that is still RUNNING, if any."""
    from bln_sweeps.tracking import tracking_client
    from bln_sweeps.tracking.contract import CELL_TAG, KIND_TAG, RUN_RUNNING, SWEEP_TAG

    client = tracking_client(uri)
    exp = client.get_experiment_by_name(sweep)
    if exp is None:
        return None
    from bln_sweeps.names import filter_string

    where = {f"tags.{KIND_TAG}": kind, f"tags.{SWEEP_TAG}": sweep, "attributes.status": RUN_RUNNING}
    query = filter_string({**where, **({f"tags.{CELL_TAG}": cell} if cell is not None else {})})
    runs = client.search_runs([exp.experiment_id], query, max_results=1)
    return runs[0].info.run_id if runs else None


def write_manifest(sweep_dir: Path, manifest: dict) -> None:
    """The manifest with URL passwords masked; the real URLs, when masking changed any, go to
    `credentials.json` (mode 0600) beside it, written first (bln_sweeps.credentials)."""
    from bln_sweeps.credentials import PRIVATE_FILE, split_private, write_private

    public, private = split_private(manifest)
    if private:
        write_private(sweep_dir / PRIVATE_FILE, private)
    tmp = sweep_dir / ".manifest.json.tmp"
    tmp.write_text(json.dumps(public, indent=2))
    os.replace(tmp, sweep_dir / "manifest.json")


def follow(sweep_dir: Path, jobs: list, poll_s: float = 2.0) -> bool:
    """Live progress until every cell is finished; False if the workers all stopped first.
    In a terminal one display updated in place, otherwise one line per event
    (launchers/live.py)."""
    from launchers.live import watch

    return watch(sweep_dir, jobs, poll_s=poll_s)


def detach_message(sweep: str) -> str:
    return (
        f"detached; the workers go on. follow: bln-sweep status {sweep} --follow · "
        f"stop: bln-sweep stop {sweep} · resume after a stop: the same bln-sweep command"
    )


def reattached(sweep_dir: Path, recorded: list[dict]) -> list:
    """Handles for this sweep's SLURM workers that are still pending or running."""
    if not any(j.get("launcher") == "slurm" for j in recorded):
        return []
    from launchers.manifest import live_jobs, reattach

    return reattach(sweep_dir, live_jobs(recorded))


def release(jobs: list) -> None:
    """Drop submitit's job handles now: their finalizers fail at interpreter shutdown."""
    import gc

    jobs.clear()
    gc.collect()


def ranked_table(manifest: dict) -> None:
    """The ranked table from the analysis module, in its own process (launchers never import
    analysis)."""
    cmd = [sys.executable, "-m", "analysis", manifest["sweep"]]
    # the URI (it may hold a password) goes through the environment, not argv, which `ps` shows
    env = {**os.environ, "MLFLOW_TRACKING_URI": manifest["tracking_uri"]}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    print(out.stdout if out.returncode == 0 else f"(no table: {out.stderr.strip()})")


def report_edges(sweep_dir: Path) -> None:
    """Cells whose best value of a searched parameter lies at an edge of its range: an
    unfinished comparison, so the sweep says so last, with the override that widens the range."""
    from bln_sweeps.search import edge_report

    lines = edge_report(sweep_dir)
    for line in lines:
        print(line)
    if not lines:
        print("no best value lies in the outer tenth of its search range")


def run_sweep(argv: list[str]) -> int:
    flags = {a for a in argv if a.startswith("--")}
    overrides = [a for a in argv if not a.startswith("--")]
    unknown = flags - {"--dry-run", "--detach", "--help"}
    if unknown:
        return fail(f"unknown flag {sorted(unknown)[0]}; valid flags: --dry-run, --detach, --help")
    if "--help" in flags:
        print(USAGE)
        return 0
    from launchers.submit import check_launcher, submit_workers

    try:
        plan = make_plan(overrides)
        check_names(plan)
        check_launcher(plan.launcher, plan.sweep_dir)
        check_storage(plan.storage_url)
        check_tracking(plan)
        if "--dry-run" in flags:
            print_plan(plan)
            print_cost(plan, per_cell=True)
            return 0
        check_cells(plan)
    except ConfigError as e:
        return fail(str(e))
    command = " ".join(["bln-sweep", *argv])
    manifest = prepare(plan, command)
    from bln_sweeps.search import STOP_FILE

    (plan.sweep_dir / STOP_FILE).unlink(missing_ok=True)  # a rerun resumes a stopped sweep
    print_plan(plan)
    print_cost(plan, per_cell=False, uri=manifest["tracking_uri"])
    jobs = reattached(plan.sweep_dir, manifest["jobs"])
    if jobs:  # the same command again while its workers still queue: follow them, no duplicates
        print(f"reattached to {len(jobs)} worker job(s) still in the queue")
    else:
        first = len(manifest["jobs"])
        jobs = submit_workers(plan.sweep_dir, plan.launcher, first_id=first)
        manifest["jobs"] += [
            {
                "job_id": str(j.job_id),
                "launcher": plan.launcher["name"],
                "worker": first + i,
                "submitted": time.time(),
            }
            for i, j in enumerate(jobs)
        ]
        write_manifest(plan.sweep_dir, manifest)
    if "--detach" in flags:
        print(f"submitted {len(jobs)} worker(s); follow with: bln-sweep status {plan.sweep}")
        release(jobs)
        return 0
    try:
        finished = follow(plan.sweep_dir, jobs)
    except KeyboardInterrupt:  # Ctrl-C: leave the workers running (they ignore SIGINT)
        print(f"\n{detach_message(plan.sweep)}")
        release(jobs)
        return 0
    for j in jobs:
        if j.done() and j.state not in ("FINISHED", "COMPLETED", "DONE"):
            try:
                j.result()
            except Exception as e:
                print(
                    f"worker {j.job_id} failed: {str(e).strip().splitlines()[-1]}", file=sys.stderr
                )
    j = None  # the loop variable would keep the last handle alive past release()
    release(jobs)
    if not finished:
        print("workers stopped before the budget was spent; rerun the same command to resume")
        return 1
    ranked_table(manifest)
    report_edges(plan.sweep_dir)
    print(f"browse the runs: bln-sweep ui {manifest['sweep']}")
    return 0


def find_sweep(name: str) -> Path:
    from bln_sweeps.names import check_name
    from launchers.plan import sweep_config

    root = Path(sweep_config([]).sweep.dir)
    known = sorted(p.parent.name for p in root.glob("*/manifest.json"))
    try:
        check_name("NAME", name)
    except ConfigError as e:
        raise ConfigError("sweep", name, f"{e}; sweeps: {', '.join(known) or 'none'}") from None
    sweep_dir = root / name
    if not (sweep_dir / "manifest.json").exists():
        raise ConfigError(
            "sweep", name, f"no such sweep in {root}/; sweeps: {', '.join(known) or 'none'}"
        )
    return sweep_dir


def status(argv: list[str]) -> int:
    from launchers.progress import cell_rows, render

    names = [a for a in argv if not a.startswith("--")]
    flags = set(argv) - set(names)
    if len(names) != 1 or flags - {"--follow"}:
        return fail("usage: bln-sweep status NAME [--follow]")
    try:
        sweep_dir = find_sweep(names[0])
    except ConfigError as e:
        return fail(str(e))
    if "--follow" not in flags:
        try:
            rows = cell_rows(sweep_dir)
        except Exception as e:  # a damaged manifest or journal: say which sweep, not a traceback
            first = (str(e).strip().splitlines() or [""])[0]
            return fail(f"sweep {names[0]!r} cannot be read: {type(e).__name__}: {first}")
        print(render(rows))
        from launchers.live import poll, summary

        print(summary(poll(sweep_dir)))
        from bln_sweeps.search import STOP_FILE

        if (stopped := sweep_dir / STOP_FILE).exists():
            when = stopped.read_text().strip()
            print(f"stopped by bln-sweep stop at {when}; the same bln-sweep command resumes it")
        return 0
    try:
        follow(sweep_dir, [])
    except KeyboardInterrupt:
        print(f"\n{detach_message(names[0])}")
    return 0


def stop(argv: list[str], wait_s: float = 120.0) -> int:
    """Ask a sweep's workers to stop: they start no new trial, and a running trial checkpoints
    after its current step and goes back to its study as WAITING (the preemption path). The same
    `bln-sweep` command resumes the sweep."""
    from bln_sweeps.search import STOP_FILE
    from launchers.live import poll

    if len(argv) != 1 or argv[0].startswith("--"):
        return fail("usage: bln-sweep stop NAME")
    try:
        sweep_dir = find_sweep(argv[0])
    except ConfigError as e:
        return fail(str(e))
    (sweep_dir / STOP_FILE).write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
    print(f"asked the workers of {argv[0]!r} to stop; waiting for running trials to checkpoint")
    deadline = time.monotonic() + wait_s
    while poll(sweep_dir).running and time.monotonic() < deadline:
        time.sleep(1.0)
    snap = poll(sweep_dir)
    queued = sum(w.startswith("preempted") for w in snap.states.values())
    if snap.running:
        print(f"{snap.running} trial(s) still running; they stop after their current step")
    print(
        f"stopped: {snap.done} run(s) done, {queued} checkpointed and queued; "
        f"resume with the same bln-sweep command"
    )
    return 0 if not snap.running else 1


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["ui"]:  # bln-sweep ui NAME [--port P] [--host H]
        from launchers.ui import run as ui

        sys.exit(ui(argv[1:]))
    commands = {"status": status, "stop": stop, "calibrate": calibrate}
    if argv[:1] and argv[0] in commands:
        sys.exit(commands[argv[0]](argv[1:]))
    sys.exit(run_sweep(argv))
