"""Worker jobs recorded in `<sweep dir>/manifest.json`, and which of them SLURM still holds.

`bln-sweep` appends one entry per submitted worker to the manifest's `jobs` (`job_id`,
`launcher`, `worker`, `submitted`: bln_sweeps.sweep.manifest.Job; a plain dict of the same keys
reads the same). Rerunning the same command should reattach to the workers
still pending or running instead of submitting duplicates: `live_jobs` asks `squeue` which
entries are alive, and `reattach` turns them back into submitit job handles the driver can follow.
Which trial and MLflow run a worker holds is in the Optuna studies (trial user attrs `worker`,
`run_dir`, `mlflow_run_id`), not here: the studies are the one source of truth for trials.
"""

import getpass
import shutil
import subprocess
from pathlib import Path
from typing import Any

ALIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "SUSPENDED", "RESIZING"}


def queue_states(user: str | None = None) -> dict[str, str] | None:
    """{job id: state} for every job of `user` in the queue, array tasks as `<array>_<task>`;
    None when squeue is missing or does not answer."""
    if shutil.which("squeue") is None:
        return None
    cmd = ["squeue", "-h", "-r", "-o", "%i|%T", "-u", user or getpass.getuser()]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return dict(line.split("|", 1) for line in out.stdout.split() if "|" in line)


def live_jobs(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The entries of the manifest's jobs whose SLURM job is still pending or running."""
    states = queue_states()
    if not states:
        return []
    return [
        j for j in jobs if j.get("launcher") == "slurm" and states.get(str(j["job_id"])) in ALIVE
    ]


def cancel_pending(jobs: list[dict[str, Any]]) -> list[str]:
    """scancel the entries whose SLURM job has not started (`bln-sweep stop`): left queued they
    would each wait for an allocation only to find the STOP file and exit. `--state=PENDING`
    makes SLURM itself skip a task that started meanwhile, so no running trial is signalled.
    Returns the ids cancelled."""
    states = queue_states() or {}
    pending = [
        str(j["job_id"])
        for j in jobs
        if j.get("launcher") == "slurm" and states.get(str(j["job_id"])) == "PENDING"
    ]
    if pending:
        subprocess.run(["scancel", "--state=PENDING", *pending], capture_output=True, timeout=30)
    return pending


def reattach(sweep_dir: Path, jobs: list[dict[str, Any]]) -> list:
    """submitit handles for recorded SLURM jobs (the folder layout launchers.slurm submits with)."""
    import submitit

    folder = Path(sweep_dir).resolve() / "jobs" / "%j"
    handles = []
    for j in jobs:
        job = submitit.SlurmJob(folder=folder, job_id=str(j["job_id"]))
        job._cancel_at_deletion = False
        handles.append(job)
    return handles


def reattached(sweep_dir: Path, recorded: list) -> list:
    """Handles for this sweep's SLURM workers that are still pending or running."""
    if not any(j.get("launcher") == "slurm" for j in recorded):
        return []
    return reattach(sweep_dir, live_jobs(recorded))
