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

import sys
import time
from pathlib import Path

from bln_sweeps.config import ConfigError
from launchers.plan import make_plan

USAGE = __doc__.split("\n\n", 1)[1]


def fail(message: str) -> int:
    from bln_sweeps.credentials import mask_text

    print(f"bln-sweep: error: {mask_text(message)}", file=sys.stderr)  # no URL password
    return 2


def calibrate(argv: list[str]) -> int:
    """`bln-sweep calibrate OVERRIDES`: time each distinct cell shape of that sweep on this
    machine (run it on a compute node) and keep the result for --dry-run's estimate."""
    from launchers.cost import calibrate as measure
    from launchers.cost import print_cost, save_calibration

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


def detach_message(sweep: str) -> str:
    return (
        f"detached; the workers go on. follow: bln-sweep status {sweep} --follow · "
        f"stop: bln-sweep stop {sweep} · resume after a stop: the same bln-sweep command"
    )


def release(jobs: list) -> None:
    """Drop submitit's job handles now: their finalizers fail at interpreter shutdown."""
    import gc

    jobs.clear()
    gc.collect()


def run_sweep(argv: list[str]) -> int:
    """Plan and check, prepare (studies, runs, manifest), submit or reattach the workers, then
    follow them to the ranked table (or detach)."""
    from launchers.cost import print_cost
    from launchers.plan import print_plan
    from launchers.prepare import check_cells, checked_plan, prepare

    flags = {a for a in argv if a.startswith("--")}
    overrides = [a for a in argv if not a.startswith("--")]
    unknown = flags - {"--dry-run", "--detach", "--help"}
    if unknown:
        return fail(f"unknown flag {sorted(unknown)[0]}; valid flags: --dry-run, --detach, --help")
    if "--help" in flags:
        print(USAGE)
        return 0
    try:
        plan = checked_plan(overrides)
        if "--dry-run" in flags:
            print_plan(plan)
            print_cost(plan, per_cell=True)
            return 0
        check_cells(plan)
    except ConfigError as e:
        return fail(str(e))
    manifest = prepare(plan, " ".join(["bln-sweep", *argv]))
    from bln_sweeps.sweep.stop import STOP_FILE

    (plan.sweep_dir / STOP_FILE).unlink(missing_ok=True)  # a rerun resumes a stopped sweep
    print_plan(plan)
    print_cost(plan, per_cell=False, uri=manifest.tracking_uri)
    jobs = start_workers(plan, manifest)
    if "--detach" in flags:
        print(f"submitted {len(jobs)} worker(s); follow with: bln-sweep status {plan.sweep}")
        release(jobs)
        return 0
    return follow_to_end(plan, manifest, jobs)


def start_workers(plan, manifest) -> list:
    """Reattach to this sweep's workers still in the queue, else submit new ones (recorded in
    the manifest)."""
    from launchers.prepare import record_jobs
    from launchers.queue import reattached
    from launchers.submit import submit_workers

    jobs = reattached(plan.sweep_dir, manifest.jobs)
    if jobs:  # the same command again while its workers still queue: follow them, no duplicates
        print(f"reattached to {len(jobs)} worker job(s) still in the queue")
        return jobs
    first = len(manifest.jobs)
    jobs = submit_workers(plan.sweep_dir, plan.launcher, first_id=first)
    record_jobs(plan, manifest, jobs, first)
    return jobs


def follow_to_end(plan, manifest, jobs: list) -> int:
    """Live progress until every cell is finished (Ctrl-C detaches), then the ranked table and
    the edge report; 1 when the workers all stopped first."""
    from launchers.live import watch
    from launchers.progress import ranked_table, report_edges

    try:
        finished = watch(plan.sweep_dir, jobs)
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
    print(f"browse the runs: bln-sweep ui {manifest.sweep}")
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
    from launchers.live import watch
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
        from bln_sweeps.sweep.stop import STOP_FILE

        if (stopped := sweep_dir / STOP_FILE).exists():
            when = stopped.read_text().strip()
            print(f"stopped by bln-sweep stop at {when}; the same bln-sweep command resumes it")
        return 0
    try:
        watch(sweep_dir, [])
    except KeyboardInterrupt:
        print(f"\n{detach_message(names[0])}")
    return 0


def stop(argv: list[str], wait_s: float = 120.0) -> int:
    """Ask a sweep's workers to stop: they start no new trial, and a running trial checkpoints
    after its current step and goes back to its study as WAITING (the preemption path); worker
    jobs still pending in the SLURM queue are cancelled. The same `bln-sweep` command resumes the
    sweep."""
    from bln_sweeps.sweep.manifest import load_manifest
    from bln_sweeps.sweep.stop import STOP_FILE
    from launchers.live import poll
    from launchers.queue import cancel_pending

    if len(argv) != 1 or argv[0].startswith("--"):
        return fail("usage: bln-sweep stop NAME")
    try:
        sweep_dir = find_sweep(argv[0])
    except ConfigError as e:
        return fail(str(e))
    try:  # a damaged manifest or journal: say which sweep, and leave it as it is
        jobs = load_manifest(sweep_dir).jobs
        poll(sweep_dir)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        return fail(f"sweep {argv[0]!r} cannot be read: {type(e).__name__}: {first}")
    (sweep_dir / STOP_FILE).write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
    if cancelled := cancel_pending(jobs):  # after STOP: a task that starts meanwhile sees it
        print(f"cancelled {len(cancelled)} worker job(s) still waiting in the SLURM queue")
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
