"""Hydra launchers that send each job of a `bln-train -m` grid through the sweep launchers.

    bln-train -m hydra/launcher=bln_local norm=layernorm,bln batch=b4,b32
    bln-train -m hydra/launcher=bln_slurm hydra.launcher.workers=8 \\
        hydra.launcher.slurm.partition=gpu norm=layernorm,bln batch=b4,b32

A thin layer over launchers.submit: the settings are those of `bln-sweep launcher=local|slurm`,
their defaults conf/launcher/local.yaml and slurm.yaml, and the same backend code checks and
submits them. `bln_local`: one process per job on this machine, at most `workers` at once, each
pinned with CUDA_VISIBLE_DEVICES to its own `gpus_per_worker` GPUs. `bln_slurm`: the whole grid
as ONE job array, `workers` array tasks at once (the same one-line errors as
`bln-sweep launcher=slurm`). Time limits are always explicit. Every job's config is composed in
the driver, jobs run a snapshot of the code taken at submit (launchers/snapshot.py), and each
runs Hydra's `run_job` for its overrides in its own process and returns the JobReturn; the driver
waits for all of them. Job logs: `<hydra.sweep.dir>/.submitit/<job id>/`.

Torch-free at import: Hydra imports every plugin at start-up.
"""

import copy
import dataclasses
import logging
import re
import sys
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger(__name__)
LOG_LINE = re.compile(r"^(submitit \w+ \(|\[\d{4}-\d\d-\d\d )")  # submitit / Hydra logs
FOLDER = "${hydra.sweep.dir}/.submitit/%j"  # job logs: <hydra.sweep.dir>/.submitit/<job id>/
# the launcher.* fields a grid uses (name is the plugin's; assumed_tflops is for sweep plans)
SETTINGS = ("workers", "timeout_min", "gpus_per_worker", "ranks_per_worker", "cpus_per_worker")


def conf_dataclass(backend: str, target: str, fields: tuple[str, ...]) -> type:
    """The schema of `hydra/launcher=bln_<backend>`: LauncherConfig's types for `fields`, their
    defaults the values of conf/launcher/<backend>.yaml (the one list of launcher defaults), so
    a misspelled or mistyped setting fails when bln-train composes the grid."""
    from bln_sweeps.config import LauncherConfig
    from launchers.submit import conf_defaults

    values = conf_defaults(backend)
    spec: list[tuple[str, Any, Any]] = [("_target_", str, f"{__name__}.{target}")]
    for f in dataclasses.fields(LauncherConfig):
        if f.name in fields:  # a factory: a mapping default must not be shared
            value = values[f.name]
            spec.append(
                (
                    f.name,
                    f.type,
                    dataclasses.field(default_factory=lambda v=value: copy.deepcopy(v)),
                )
            )
    spec.append(("submitit_folder", str, FOLDER))
    return dataclasses.make_dataclass(f"Bln{backend.title()}Conf", spec)


BlnLocalConf = conf_dataclass("local", "BlnLocalLauncher", SETTINGS)
BlnSlurmConf = conf_dataclass("slurm", "BlnSlurmLauncher", (*SETTINGS, "slurm"))
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
    """A Hydra launcher over the sweep launchers (launchers.submit); `backend` names which."""

    backend = ""

    def __init__(self, **params: Any) -> None:
        self.params = {
            k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
            for k, v in params.items()
        }
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def launcher(self) -> Any:
        """The sweep launcher with these settings: job logs in `submitit_folder`, the code
        snapshot in hydra.sweep.dir, SLURM jobs named bln-train."""
        from launchers.submit import launcher_for

        assert self.config is not None
        settings = {k: v for k, v in self.params.items() if k in SETTINGS or k == "slurm"}
        return launcher_for(
            {"name": self.backend, **settings},
            Path(str(self.config.hydra.sweep.dir)),
            folder=Path(str(self.params["submitit_folder"])),
            job_name="train",
        )

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        from bln_sweeps.config import ConfigError

        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function
        try:  # bad launcher settings fail before anything is created
            self.launcher().check(Path(str(config.hydra.sweep.dir)).resolve())
        except ConfigError as e:
            fail(e)

    def launch(self, job_overrides: Any, initial_job_idx: int) -> list[JobReturn]:
        assert self.config is not None and self.hydra_context is not None
        setup_globals()
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        args = []
        for i, overrides in enumerate(job_overrides):
            idx = initial_job_idx + i
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            args.append((cfg, idx, Singleton.get_state()))
        backend = self.launcher()
        jobs = backend.submit(BlnJob(self.hydra_context, self.task_function), args)
        log.info(f"{type(self).__name__}: {len(jobs)} jobs, logs in {backend.folder.parent}")
        try:
            done = zip(args, backend.follow(jobs), strict=True)
            return [self.result(idx, job) for (_, idx, _), job in done]
        except BaseException:  # a failed job (or Ctrl-C) ends the grid: stop the others
            backend.cancel(jobs)
            raise

    @staticmethod
    def result(idx: int, job: Any) -> JobReturn:
        ret = job.result()  # raises (with the job's stderr tail) when the job itself failed
        log.info(f"\t#{idx} : job {job.job_id} {ret.status.name} · log {job.paths.stdout}")
        for line in (job.stdout() or "").splitlines():  # the task's own output, not the logs
            if not LOG_LINE.match(line):
                print(line, flush=True)
        return ret


class BlnLocalLauncher(BlnLauncher):
    """One process per job on this machine, at most `workers` at once."""

    backend = "local"


class BlnSlurmLauncher(BlnLauncher):
    """The grid as ONE SLURM job array."""

    backend = "slurm"
