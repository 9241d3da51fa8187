"""One launcher interface, several backends, as submitit's Executor: `Launcher` submits jobs,
follows them and cancels them; a backend fills in small hooks (checks, GPU assignment, executor
creation, job parameters). `LocalLauncher` runs processes on this machine (each on its own GPUs),
`DebugLauncher` runs in this process (breakpoints work), `launchers.slurm.SlurmLauncher` submits
one SLURM job array. The sweep driver (`submit_workers`) and the Hydra launcher plugin
(hydra_plugins/bln_launcher) both submit through it.

Settings are `launcher.*` as a dict; their defaults are conf/launcher/<name>.yaml and nowhere
else (`conf_defaults`). Time limits are always explicit: submitit's local default of 2 minutes
never applies. Local and SLURM jobs run a snapshot of the code taken at submit
(launchers/snapshot.py).

Torch-free at import: the login node submits.
"""

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bln_sweeps.config import ConfigError

LAUNCHERS = ("local", "slurm", "debug")
POLL_S = 0.5  # how often a full local queue checks for a free slot


def conf_defaults(name: str) -> dict[str, Any]:
    """conf/launcher/<name>.yaml on its schema (LauncherConfig): the one list of launcher
    defaults, for callers that do not compose a sweep (the Hydra plugin, and the launcher.slurm
    values a caller leaves out)."""
    from omegaconf import OmegaConf

    from bln_sweeps.config import CONF_DIR, LauncherConfig

    values = OmegaConf.load(CONF_DIR / "launcher" / f"{name}.yaml")
    values.pop("defaults", None)  # [base, _self_]: `base` is LauncherConfig, merged here
    merged = OmegaConf.merge(OmegaConf.structured(LauncherConfig), values)
    return OmegaConf.to_container(merged, throw_on_missing=True)


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


class Launcher:
    """Where jobs run. `submit` -> `follow` -> (`cancel`); a backend overrides the hooks.

    `settings` is launcher.* as a dict; `sweep_dir` holds the code snapshot (and, for the sweep,
    the job folders); `folder` is submitit's job folder (with `%j`); `job_name` names SLURM jobs
    bln-<job_name>; `keep_running` lets jobs outlive this driver (sweep workers) instead of being
    cancelled with their handles (Hydra grid jobs)."""

    frozen_code = True  # jobs run the code snapshot, not the live checkout

    def __init__(
        self,
        settings: dict[str, Any],
        sweep_dir: Path,
        folder: Path | None = None,
        job_name: str | None = None,
        keep_running: bool = False,
    ) -> None:
        self.settings = settings
        self.sweep_dir = Path(sweep_dir)
        self.folder = Path(folder) if folder is not None else self.sweep_dir / "jobs" / "%j"
        self.job_name = job_name or self.sweep_dir.name
        self.keep_running = keep_running

    # ---- hooks ---------------------------------------------------------------------------------

    def check(self, sweep_dir: Path | None = None) -> None:
        """Reject bad settings before anything is created (raise ConfigError)."""
        ranks_per_worker(self.settings)

    def slots(self) -> list[list[int]]:
        """GPU assignment: the GPU set of each job that may run at once."""
        return [[] for _ in range(self.settings["workers"])]

    def executor(self, gpus: list[int], env: dict[str, str]) -> Any:
        """A submitit executor, its parameters set, for a job on `gpus` with `env`."""
        raise NotImplementedError

    def job_env(self, env: dict[str, str]) -> dict[str, str]:
        """The environment of every job (`env`: the code snapshot's)."""
        return env

    # ---- the interface -------------------------------------------------------------------------

    def submit(self, fn: Callable, args: list[tuple]) -> list:
        """One job per argument tuple, at most len(slots()) running at once (a full queue waits
        here for a free slot); returns submitit jobs in the order of `args`."""
        env = self.job_env(self.snapshot_env())
        slots = self.slots()
        jobs: list[Any] = [None] * len(args)
        running: dict[int, Any] = {}  # slot -> job
        pending = list(range(len(args)))
        while pending:
            for slot in [s for s, j in running.items() if j.done()]:
                del running[slot]
            for slot in [s for s in range(len(slots)) if s not in running][: len(pending)]:
                i = pending.pop(0)
                executor = self.executor(slots[slot], env)
                # jobs inherit this process's environment, file descriptors and signal dispositions
                with environment(env), detached():
                    jobs[i] = running[slot] = executor.submit(fn, *args[i])
                self.adopt(jobs[i])
            if pending:
                time.sleep(POLL_S)
        return jobs

    def follow(self, jobs: list) -> Iterator[Any]:
        """Each job, in submission order, once it has ended."""
        for job in jobs:
            job.wait()
            yield job

    def cancel(self, jobs: list) -> None:
        """Stop the jobs still queued or running."""
        for job in jobs:
            if job is not None and not job.done():
                job.cancel(check=False)

    # ---- shared steps --------------------------------------------------------------------------

    def snapshot_env(self) -> dict[str, str]:
        from launchers import snapshot

        if not self.frozen_code:
            return {}
        return snapshot.job_env(snapshot.take(self.sweep_dir))  # queued jobs never see edits

    def adopt(self, job: Any) -> None:
        if self.keep_running:
            job._cancel_at_deletion = False  # workers outlive a detached or killed driver


class LocalLauncher(Launcher):
    """Processes on this machine through submitit's LocalExecutor, each on its own GPUs."""

    def check(self, sweep_dir: Path | None = None) -> None:
        super().check(sweep_dir)
        for key in ("workers", "timeout_min", "gpus_per_worker", "cpus_per_worker"):
            value, least = self.settings[key], 0 if key == "gpus_per_worker" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"launcher.{key}", value, f"a whole number >= {least}")
        self.slots()

    def slots(self) -> list[list[int]]:
        s = self.settings
        return gpu_assignment(s["workers"], s["gpus_per_worker"], visible_gpus())

    def job_env(self, env: dict[str, str]) -> dict[str, str]:
        # N jobs on one machine: each gets its share of the cores, or torch's default (every
        # core per process) oversubscribes them and every job slows down.
        threads = str(self.settings["cpus_per_worker"])
        return {**env, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}

    def executor(self, gpus: list[int], env: dict[str, str]) -> Any:
        import submitit  # `env` reaches the job through this process's environment (submit)

        executor = submitit.LocalExecutor(folder=self.folder)
        executor.update_parameters(
            timeout_min=self.settings["timeout_min"],
            gpus_per_node=len(gpus),
            visible_gpus=gpus,
            tasks_per_node=ranks_per_worker(self.settings),  # the ranks of each trial
        )
        return executor


class DebugLauncher(Launcher):
    """Every job in this process, one after another, on the live code: breakpoints work."""

    frozen_code = False

    def submit(self, fn: Callable, args: list[tuple]) -> list:
        for a in args:
            fn(*a)
        return []  # nothing left to follow or cancel


def launcher_for(settings: dict[str, Any], sweep_dir: Path, **kwargs: Any) -> Launcher:
    """The backend named by `settings["name"]` (launcher=local|slurm|debug)."""
    name = settings["name"]
    if name not in LAUNCHERS:
        raise ConfigError("launcher", name, f"valid choices: {', '.join(LAUNCHERS)}")
    if name == "slurm":
        from launchers.slurm import SlurmLauncher  # submitit's SLURM side only when asked for

        return SlurmLauncher(settings, sweep_dir, **kwargs)
    return {"local": LocalLauncher, "debug": DebugLauncher}[name](settings, sweep_dir, **kwargs)


def check_launcher(launcher: dict[str, Any], sweep_dir: Path | None = None) -> None:
    """bln-sweep's launcher settings, checked before the sweep is created."""
    launcher_for(launcher, sweep_dir or Path(".")).check(sweep_dir)


def submit_workers(sweep_dir: Path, launcher: dict[str, Any], first_id: int = 0) -> list:
    """Submit `launcher.workers` sweep workers (`bln_sweeps.sweep.worker.worker_main`, pickled by
    reference); returns submitit jobs (none for `debug`, whose workers have run by then)."""
    from bln_sweeps.sweep.worker import worker_main

    backend = launcher_for(launcher, sweep_dir, keep_running=True)
    fn: Callable = worker_main
    if launcher["name"] == "slurm":  # checkpoint and requeue at a time limit or preemption
        from launchers.requeue import WorkerJob

        fn = WorkerJob()
    ids = range(first_id, first_id + launcher["workers"])
    return backend.submit(fn, [(str(backend.sweep_dir), i) for i in ids])


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
