"""Hydra launchers that send each job of a `bln-train -m` grid through submitit.

    bln-train -m hydra/launcher=bln_local norm=layernorm,bln batch=b4,b32
    bln-train -m hydra/launcher=bln_slurm hydra.launcher.workers=8 \\
        hydra.launcher.slurm.partition=gpu norm=layernorm,bln batch=b4,b32

`bln_local`: one process per job on this machine, at most `workers` at once, each pinned with
CUDA_VISIBLE_DEVICES to its own `gpus_per_worker` GPUs when GPUs are visible
(launchers.submit.gpu_assignment). `bln_slurm`: the whole grid as ONE job array, `workers` array
tasks at once, parameters checked by launchers.slurm (the same one-line errors as
`bln-sweep launcher=slurm`). Time limits are always explicit. Every job's config is composed in
the driver, jobs run a snapshot of the code taken at submit (launchers/snapshot.py), and each
runs Hydra's `run_job` for its overrides in its own process and returns the JobReturn; the driver
waits for all of them. Job logs: `<hydra.sweep.dir>/.submitit/<job id>/`.

Torch-free at import: Hydra imports every plugin at start-up.
"""

import copy
import logging
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger(__name__)
POLL_S = 0.5
LOG_LINE = re.compile(r"^(submitit \w+ \(|\[\d{4}-\d\d-\d\d )")  # submitit / Hydra logs


def slurm_defaults() -> dict[str, Any]:
    from launchers import slurm

    return {**dict.fromkeys(slurm.valid_names()), **slurm.DEFAULTS}


@dataclass
class BlnLocalConf:
    _target_: str = "hydra_plugins.bln_launcher.bln_launcher.BlnLocalLauncher"
    workers: int | None = None  # jobs at once; null: one per GPU set, or 1 without GPUs
    timeout_min: int = 600  # per job (submitit's local default of 2 min never applies)
    gpus_per_worker: int | None = None  # null: 1 when GPUs are visible, else 0
    cpus_per_worker: int = 1  # OMP/MKL threads of each job
    submitit_folder: str = "${hydra.sweep.dir}/.submitit/%j"


@dataclass
class BlnSlurmConf:
    _target_: str = "hydra_plugins.bln_launcher.bln_launcher.BlnSlurmLauncher"
    workers: int = 4  # array tasks running at once (--array=...%workers)
    timeout_min: int = 240  # --time of each job (minutes)
    gpus_per_worker: int = 1  # --gpus-per-node; 0 on a CPU partition
    cpus_per_worker: int = 8  # --cpus-per-task
    # every other SlurmExecutor parameter under submitit's name, as in conf/launcher/slurm.yaml
    # (listed, so that a misspelled name fails when bln-train composes the grid)
    slurm: dict[str, Any] = field(default_factory=lambda: slurm_defaults())
    submitit_folder: str = "${hydra.sweep.dir}/.submitit/%j"


ConfigStore.instance().store(group="hydra/launcher", name="bln_local", node=BlnLocalConf)
ConfigStore.instance().store(group="hydra/launcher", name="bln_slurm", node=BlnSlurmConf)


def fail(e: Exception) -> None:
    """A ConfigError as bln-train reports bad input: one line on stderr, exit code 2."""
    key = getattr(e, "key", None)
    if key is not None and key.startswith("launcher"):
        e = type(e)("hydra." + key, e.value, e.expected)
    print(f"bln-train: error: {e}", file=sys.stderr)
    raise SystemExit(2)


class BlnJob:
    """What each submitit job runs: Hydra's run_job on a config composed by the driver."""

    def __init__(self, hydra_context: HydraContext, task_function: TaskFunction) -> None:
        self.hydra_context = hydra_context
        self.task_function = task_function

    def __call__(
        self, sweep_config: DictConfig, job_num: int, singleton_state: dict[Any, Any]
    ) -> JobReturn:
        import signal

        import submitit

        from bln_sweeps.checkpoint import StopSignals

        Singleton.set_state(singleton_state)
        setup_globals()
        # a copy: run_job makes its config read-only, and a requeue pickles the arguments again
        sweep_config = copy.deepcopy(sweep_config)
        with read_write(sweep_config.hydra.job), open_dict(sweep_config.hydra.job) as job:
            job.id = submitit.JobEnvironment().job_id
            job.num = job_num

        # submitit's checkpoint signal (SIGUSR2 before a SLURM time limit, or preemption) goes to
        # the trainer, which finishes its step, saves and stops (bln-train exits 3); then
        # submitit requeues this job, which resumes from that checkpoint. As WorkerJob does.
        preempt = submitit.JobEnvironment._usr_sig()
        requeue = signal.getsignal(preempt)  # submitit's checkpoint-and-requeue handler
        requeue = requeue if callable(requeue) else None
        relayed = []

        def relay(signum: int, frame: Any) -> None:
            trainer = signal.getsignal(signal.SIGUSR1)
            if isinstance(getattr(trainer, "__self__", None), StopSignals):
                relayed.append(signum)
                trainer(signum, frame)  # checkpoint after this step, then Preempted
            elif requeue is not None:
                requeue(signum, frame)  # not training yet (or any more): requeue at once

        signal.signal(preempt, relay)
        try:
            return run_job(
                hydra_context=self.hydra_context,
                task_function=self.task_function,
                config=sweep_config,
                job_dir_key="hydra.sweep.dir",
                job_subdir_key="hydra.sweep.subdir",
            )
        except SystemExit as e:  # bln-train's task: 3 = stopped by a signal after saving
            if e.code == 3 and relayed and requeue is not None:
                requeue(preempt, None)  # exits: requeued, or an error past max_num_timeout
            raise

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's requeue: the same job again; the run resumes from its checkpoint in the
        same MLflow run."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


class BlnLauncher(Launcher):
    def __init__(self, **params: Any) -> None:
        self.params = {
            k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
            for k, v in params.items()
        }
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        from bln_sweeps.config import ConfigError

        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function
        try:
            self.check()
        except ConfigError as e:
            fail(e)

    def check(self) -> None:
        """Reject bad launcher settings before anything is created (raise ConfigError)."""

    def launch(self, job_overrides: Any, initial_job_idx: int) -> list[JobReturn]:
        from launchers import snapshot

        assert self.config is not None and self.hydra_context is not None
        setup_globals()
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        folder = Path(str(self.params["submitit_folder"]))
        args = []
        for i, overrides in enumerate(job_overrides):
            idx = initial_job_idx + i
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            args.append((cfg, idx, Singleton.get_state()))
        env = snapshot.job_env(snapshot.take(sweep_dir))  # queued jobs never see later edits
        task = BlnJob(self.hydra_context, self.task_function)
        jobs = self.submit(task, args, folder, env)
        log.info(f"{type(self).__name__}: {len(jobs)} jobs, logs in {folder.parent}")
        return [self.result(idx, job) for (_, idx, _), job in zip(args, jobs, strict=True)]

    def submit(self, task: BlnJob, args: list, folder: Path, env: dict[str, str]) -> list:
        raise NotImplementedError

    @staticmethod
    def result(idx: int, job: Any) -> JobReturn:
        ret = job.result()  # raises (with the job's stderr tail) when the job itself failed
        log.info(f"\t#{idx} : job {job.job_id} {ret.status.name} · log {job.paths.stdout}")
        for line in (job.stdout() or "").splitlines():  # the task's own output, not the logs
            if not LOG_LINE.match(line):
                print(line, flush=True)
        return ret


class BlnLocalLauncher(BlnLauncher):
    def slots(self) -> list[list[int]]:
        from bln_sweeps.config import ConfigError
        from launchers.submit import gpu_assignment, visible_gpus

        p = self.params
        gpus = visible_gpus()
        per = p["gpus_per_worker"]
        per = (1 if gpus else 0) if per is None else per
        workers = p["workers"]
        if workers is None:
            workers = max(1, len(gpus) // per) if per else 1
        for key, value, least in (
            ("workers", workers, 1),
            ("timeout_min", p["timeout_min"], 1),
            ("gpus_per_worker", per, 0),
            ("cpus_per_worker", p["cpus_per_worker"], 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"hydra.launcher.{key}", value, f"a whole number >= {least}")
        return gpu_assignment(workers, per, gpus)

    def check(self) -> None:
        self.slots()

    def submit(self, task: BlnJob, args: list, folder: Path, env: dict[str, str]) -> list:
        import submitit

        from launchers.submit import detached, environment

        slots = self.slots()
        threads = str(self.params["cpus_per_worker"])
        env = {**env, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        jobs: list[Any] = [None] * len(args)
        running: dict[int, Any] = {}  # slot -> job; at most len(slots) jobs at once
        pending = list(range(len(args)))
        while pending or running:
            for slot in [s for s, j in running.items() if j.done()]:
                del running[slot]
            for slot in [s for s in range(len(slots)) if s not in running]:
                if not pending:
                    break
                i = pending.pop(0)
                ex = submitit.LocalExecutor(folder=folder)
                ex.update_parameters(
                    timeout_min=self.params["timeout_min"],
                    gpus_per_node=len(slots[slot]),
                    visible_gpus=slots[slot],
                )
                # jobs inherit this process's environment and file descriptors
                with environment(env), detached():
                    jobs[i] = running[slot] = ex.submit(task, *args[i])
            if running:
                time.sleep(POLL_S)
        return jobs


class BlnSlurmLauncher(BlnLauncher):
    def launcher_dict(self) -> dict[str, Any]:
        return {"name": "slurm", **{k: v for k, v in self.params.items() if k != "_target_"}}

    def check(self) -> None:
        from launchers import slurm

        assert self.config is not None
        slurm.settings(self.launcher_dict())  # typos first: no cluster needed to report them
        slurm.check(self.launcher_dict(), Path(str(self.config.hydra.sweep.dir)).resolve())

    def submit(self, task: BlnJob, args: list, folder: Path, env: dict[str, str]) -> list:
        import shlex

        import submitit

        from launchers import slurm

        assert self.config is not None
        params, ctor = slurm.settings(self.launcher_dict(), "train")  # job name bln-train
        exports = [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
        params["setup"] = exports + list(params.get("setup") or [])
        ex = submitit.AutoExecutor(
            folder=folder.resolve(), cluster="slurm", **{f"slurm_{k}": v for k, v in ctor.items()}
        )
        ex.update_parameters(**{f"slurm_{k}": v for k, v in params.items()})
        return ex.map_array(task, *zip(*args, strict=True))
