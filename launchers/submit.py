"""Worker jobs through submitit: local processes (one GPU each), in-process for debugging, or
one SLURM job array (launchers/slurm.py).

Every job runs `bln_sweeps.search.worker_main(sweep_dir, worker_id)`, a module-level function
(pickled by reference). Time limits are always explicit: submitit's local default of 2 minutes
never applies. Local and SLURM jobs run a snapshot of the code taken at submit
(launchers/snapshot.py).
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bln_sweeps.config import ConfigError

LAUNCHERS = ("local", "slurm", "debug")


def visible_gpus() -> list[int]:
    """GPU indices this machine offers, honouring an existing CUDA_VISIBLE_DEVICES; no torch
    import (nvidia-smi is the probe when the variable is unset)."""
    import shutil
    import subprocess

    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [int(x) for x in env.split(",") if x.strip().isdigit()]
    if shutil.which("nvidia-smi") is None:
        return []
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    return list(range(sum(line.startswith("GPU ") for line in out.stdout.splitlines())))


def gpu_assignment(workers: int, gpus_per_worker: int, gpus: list[int]) -> list[list[int]]:
    """Disjoint GPU sets, one per worker (never the same GPU for every job)."""
    if gpus_per_worker == 0:
        return [[] for _ in range(workers)]
    need = workers * gpus_per_worker
    if need > len(gpus):
        raise ConfigError(
            "launcher.workers",
            workers,
            f"needs {need} GPUs ({gpus_per_worker} per worker) but this machine has {len(gpus)}",
        )
    return [gpus[i * gpus_per_worker : (i + 1) * gpus_per_worker] for i in range(workers)]


def check_launcher(launcher: dict[str, Any], sweep_dir: Path | None = None) -> None:
    if launcher["name"] not in LAUNCHERS:
        raise ConfigError("launcher", launcher["name"], f"valid choices: {', '.join(LAUNCHERS)}")
    if launcher["name"] == "local":
        gpu_assignment(launcher["workers"], launcher["gpus_per_worker"], visible_gpus())
    if launcher["name"] == "slurm":
        from launchers import slurm

        slurm.check(launcher, sweep_dir)


def submit_workers(sweep_dir: Path, launcher: dict[str, Any], first_id: int = 0) -> list:
    """Submit `launcher.workers` worker jobs; returns submitit jobs. `debug` runs the workers
    one after another in this process (breakpoints work) and returns no jobs."""
    import submitit

    from bln_sweeps.search import worker_main
    from launchers import snapshot

    name, n = launcher["name"], launcher["workers"]
    folder = sweep_dir / "jobs" / "%j"
    if name == "debug":  # in this process, on the live code: for breakpoints
        for i in range(n):
            worker_main(str(sweep_dir), first_id + i)
        return []
    env = snapshot.job_env(snapshot.take(sweep_dir))  # queued jobs never see later edits
    if name == "slurm":
        from launchers import slurm

        return slurm.submit(sweep_dir, launcher, first_id, env=env)
    gpus = gpu_assignment(n, launcher["gpus_per_worker"], visible_gpus())
    jobs = []
    with environment(env):  # local jobs inherit this process's environment at submit
        for i, worker_gpus in enumerate(gpus):
            ex = submitit.LocalExecutor(folder=folder)
            ex.update_parameters(
                timeout_min=launcher["timeout_min"],
                gpus_per_node=len(worker_gpus),
                visible_gpus=worker_gpus,
            )
            job = ex.submit(worker_main, str(sweep_dir), first_id + i)
            job._cancel_at_deletion = False  # workers outlive a detached or killed driver
            jobs.append(job)
    return jobs


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
