"""Worker jobs through submitit: local processes (one GPU each), in-process for debugging, or
one SLURM job array (launchers/slurm.py).

Every job runs `bln_sweeps.sweep.worker.worker_main(sweep_dir, worker_id)`, a module-level function
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


def ranks_per_worker(launcher: dict[str, Any]) -> int:
    """Processes per worker job, each one rank of every trial it runs (DDP): one per GPU, or
    `launcher.ranks_per_worker` (which must then equal gpus_per_worker, or stands alone on CPU,
    where the ranks talk over gloo)."""
    ranks, gpus = launcher.get("ranks_per_worker", 0), launcher["gpus_per_worker"]
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 0:
        raise ConfigError("launcher.ranks_per_worker", ranks, "a whole number >= 0")
    if ranks and gpus and ranks != gpus:
        raise ConfigError(
            "launcher.ranks_per_worker",
            ranks,
            f"must equal launcher.gpus_per_worker={gpus} (one rank per GPU) or be 0",
        )
    ranks = ranks or max(1, gpus)
    if ranks > 1 and launcher["name"] == "debug":
        raise ConfigError(
            "launcher.ranks_per_worker", ranks, "launcher=debug runs one rank; use local or slurm"
        )
    return ranks


def check_launcher(launcher: dict[str, Any], sweep_dir: Path | None = None) -> None:
    if launcher["name"] not in LAUNCHERS:
        raise ConfigError("launcher", launcher["name"], f"valid choices: {', '.join(LAUNCHERS)}")
    ranks_per_worker(launcher)
    if launcher["name"] == "local":
        gpu_assignment(launcher["workers"], launcher["gpus_per_worker"], visible_gpus())
    if launcher["name"] == "slurm":
        from launchers import slurm

        slurm.check(launcher, sweep_dir)


def submit_workers(sweep_dir: Path, launcher: dict[str, Any], first_id: int = 0) -> list:
    """Submit `launcher.workers` worker jobs; returns submitit jobs. `debug` runs the workers
    one after another in this process (breakpoints work) and returns no jobs."""
    import submitit

    from bln_sweeps.sweep.worker import worker_main
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
    # N workers on one machine: each gets its share of the cores, or torch's default (every
    # core per process) oversubscribes them and every worker slows down.
    threads = str(launcher["cpus_per_worker"])
    env = {**env, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    jobs = []
    # local jobs inherit this process's environment, file descriptors and signal dispositions
    with environment(env), detached():
        for i, worker_gpus in enumerate(gpus):
            ex = submitit.LocalExecutor(folder=folder)
            ex.update_parameters(
                timeout_min=launcher["timeout_min"],
                gpus_per_node=len(worker_gpus),
                visible_gpus=worker_gpus,
                tasks_per_node=ranks_per_worker(launcher),  # the ranks of each trial
            )
            job = ex.submit(worker_main, str(sweep_dir), first_id + i)
            job._cancel_at_deletion = False  # workers outlive a detached or killed driver
            jobs.append(job)
    return jobs


@contextmanager
def detached() -> Iterator[None]:
    """Spawn local workers that outlive this driver's terminal: stdin/stdout/stderr on
    /dev/null (an inherited pipe would keep a caller reading the driver's output waiting until
    every worker ends, and a closed terminal would break their writes), and SIGHUP ignored (an
    SSH disconnect hangs up the driver's process group). SIGINT too: Ctrl-C in the live view
    reaches the whole foreground process group, and it detaches the view, not the workers
    (`bln-sweep stop` stops them). Workers log to their job folders."""
    import signal
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(fd) for fd in (0, 1, 2)]
    null = os.open(os.devnull, os.O_RDWR)
    hup = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    intr = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        yield
    finally:
        for fd, copy in zip((0, 1, 2), saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)
        os.close(null)
        signal.signal(signal.SIGHUP, hup)
        signal.signal(signal.SIGINT, intr)


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
