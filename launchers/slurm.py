"""`launcher=slurm`: a sweep's workers as ONE SLURM job array, through submitit.

    bln-sweep launcher=slurm launcher.workers=8 launcher.gpus_per_worker=1 \\
        launcher.slurm.partition=gpu launcher.slurm.account=myproj launcher.slurm.mem_gb=64

LauncherConfig's own fields become submitit's generic parameters (timeout_min -> --time,
cpus_per_worker -> --cpus-per-task, gpus_per_worker -> --gpus-per-node, workers -> the array
size). `launcher.slurm` takes every other parameter of submitit's SlurmExecutor under submitit's
name (partition, account, qos, mem, constraint, setup, additional_parameters, ...), plus `mem_gb`
and the executor's constructor arguments `max_num_timeout` and `python`. A misspelled name, a
time limit or a memory request SLURM would reject, and a missing `sbatch` fail before anything is
created, as one-line ConfigErrors.

Time limits and preemption (WorkerJob): submitit asks SLURM for SIGUSR2 `signal_delay_s` before
the time limit (`--signal=USR2@N`). The worker relays it to the running trainer, which finishes
its step, writes its checkpoint and raises `Preempted`; the worker hands the trial back to its
study, and submitit requeues this array task with `scontrol requeue`. The requeued task runs the
same worker again, which resumes the trial from the checkpoint in the same MLflow run. SIGTERM
(`scontrol requeue`, preemption, scancel) makes the trainer checkpoint the same way; SLURM itself
then requeues or ends the job.

Torch-free at import: the login node only builds sbatch parameters. Override values never pass
through a shell: they travel in the sweep manifest and in submitit's pickle.
"""

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import submitit

from bln_sweeps.config import ConfigError

# submitit parameters that LauncherConfig already owns: set them there, not in launcher.slurm
OWNED = {
    "time": "launcher.timeout_min",
    "timeout_min": "launcher.timeout_min",
    "cpus_per_task": "launcher.cpus_per_worker",
    "gpus_per_node": "launcher.gpus_per_worker",
    "num_gpus": "launcher.gpus_per_worker",
}
# not sbatch parameters of SlurmExecutor.update_parameters, but reachable from launcher.slurm
EXTRA = {
    "mem_gb": "memory per worker in GB (submitit's generic name; or mem: 16G)",
    "max_num_timeout": "requeues after a time limit before a worker gives up (SlurmExecutor)",
    "python": "command that starts python in the job, e.g. a container (SlurmExecutor)",
}
DEFAULTS = {"signal_delay_s": 120, "max_num_timeout": 10}
LISTS = ("setup", "teardown", "srun_args")
MEM_RE = re.compile(r"^(\d+)([KMGT]B?)?$", re.IGNORECASE)
# An sbatch long option's name, as `additional_parameters` keys become `#SBATCH --<key>=...`
OPTION_RE = re.compile(r"^[A-Za-z][A-Za-z0-9-]*$")


def check_one_line(key: str, value: Any) -> None:
    """Every string in a SLURM setting (keys of mappings included) stays on its own line of the
    batch script: a newline in `comment` would end the #SBATCH line and run the rest as shell,
    and every #SBATCH line after the first shell line is ignored by sbatch."""
    import unicodedata

    if isinstance(value, dict):
        for k, v in value.items():
            check_one_line(key, k)
            check_one_line(f"{key}.{k}", v)
        return
    if isinstance(value, (list, tuple)):
        for v in value:
            check_one_line(key, v)
        return
    bad = [c for c in str(value) if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")]
    if bad:
        raise ConfigError(
            key, value, f"contains the control character {bad[0]!r}; a value must be one line"
        )


def valid_names() -> list[str]:
    """What `launcher.slurm` accepts: submitit's own SlurmExecutor parameter names, less the ones
    LauncherConfig owns, plus EXTRA."""
    sbatch = submitit.SlurmExecutor._valid_parameters()
    return sorted((sbatch - OWNED.keys()) | EXTRA.keys())


def slurm_minutes(text: str) -> float | None:
    """A SLURM time (`M`, `M:S`, `H:M:S`, `D-H`, `D-H:M`, `D-H:M:S`) in minutes; None for
    infinite/unlimited. Raises ValueError when SLURM would not parse it either."""
    text = text.strip()
    if text.lower() in ("infinite", "unlimited"):
        return None
    days, dash, rest = text.partition("-")
    if not dash:
        days, rest = "", text
    parts = rest.split(":")
    if not all(p.isdigit() for p in parts) or (dash and not days.isdigit()) or len(parts) > 3:
        raise ValueError(f"not a SLURM time: {text!r}")
    nums = [int(p) for p in parts]
    if days:  # D-H, D-H:M, D-H:M:S
        h, m, s = (nums + [0, 0])[:3]
        return int(days) * 1440 + h * 60 + m + s / 60
    if len(nums) == 1:
        return float(nums[0])
    if len(nums) == 2:  # M:S
        return nums[0] + nums[1] / 60
    return nums[0] * 60 + nums[1] + nums[2] / 60


def mem_megabytes(value: Any) -> float:
    """A SLURM --mem value (`16G`, `16000M`, `16GB`, a bare number = MB) in MB; raises
    ValueError when SLURM would reject it (non-integer, unknown unit, <= 0)."""
    m = MEM_RE.match(str(value).strip())
    if not m or int(m.group(1)) <= 0:
        raise ValueError(value)
    unit = (m.group(2) or "M")[0].upper()
    return int(m.group(1)) * {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024**2}[unit]


def settings(launcher: dict[str, Any], sweep: str = "sweep") -> tuple[dict, dict]:
    """LauncherConfig (as a dict) -> (SlurmExecutor parameters, constructor arguments), checked.
    Every value error names its key (launcher.slurm.<name>) and what SLURM accepts."""
    given = {k: v for k, v in (launcher.get("slurm") or {}).items() if v is not None}
    valid = valid_names()
    for name, value in given.items():
        check_one_line(f"launcher.slurm.{name}", name)
        check_one_line(f"launcher.slurm.{name}", value)
    for name in given:
        if name in OWNED:
            raise ConfigError(f"launcher.slurm.{name}", given[name], f"set {OWNED[name]} instead")
        if name not in valid:
            raise ConfigError(
                f"launcher.slurm.{name}",
                given[name],
                f"unknown SLURM parameter; valid names: {', '.join(valid)}",
            )
    opts = {**DEFAULTS, **given}
    ctor = {k: opts.pop(k) for k in ("max_num_timeout", "python") if k in opts}

    minutes = launcher.get("timeout_min")
    if isinstance(minutes, bool) or not isinstance(minutes, int) or minutes < 1:
        raise ConfigError("launcher.timeout_min", minutes, "a whole number of minutes >= 1")
    delay = opts["signal_delay_s"]
    if isinstance(delay, bool) or not isinstance(delay, int) or not 0 < delay < minutes * 60:
        raise ConfigError(
            "launcher.slurm.signal_delay_s",
            delay,
            f"seconds between the checkpoint signal and the time limit: 0 < s < {minutes * 60}"
            " (launcher.timeout_min * 60)",
        )
    if "mem" in opts and "mem_gb" in opts:
        raise ConfigError("launcher.slurm.mem_gb", opts["mem_gb"], "give mem or mem_gb, not both")
    if "mem_gb" in opts:
        gb = opts.pop("mem_gb")
        if isinstance(gb, bool) or not isinstance(gb, (int, float)) or not gb > 0:
            raise ConfigError("launcher.slurm.mem_gb", gb, "a number of GB > 0")
        opts["mem"] = submitit.slurm.slurm._convert_mem(gb)
    for key in ("mem", "mem_per_cpu", "mem_per_gpu"):
        if key in opts:
            try:
                mem_megabytes(opts[key])
            except ValueError:
                raise ConfigError(
                    f"launcher.slurm.{key}",
                    opts[key],
                    "a positive whole size SLURM accepts: 16G, 16000M, 1T (a bare number is MB)",
                ) from None
    for key in LISTS:
        if key in opts and (
            not isinstance(opts[key], (list, tuple))
            or not all(isinstance(x, str) for x in opts[key])
        ):
            raise ConfigError(f"launcher.slurm.{key}", opts[key], "a list of strings")
    extra = opts.get("additional_parameters")
    if extra is not None and not isinstance(extra, dict):
        raise ConfigError(
            "launcher.slurm.additional_parameters", extra, "a mapping of sbatch option -> value"
        )
    for option in extra or {}:  # submitit writes keys unquoted: `#SBATCH --<key>=<value>`
        if not OPTION_RE.match(str(option)):
            raise ConfigError(
                f"launcher.slurm.additional_parameters.{option}",
                extra[option],
                "not an sbatch option name (letters, digits and '-', e.g. mail-type)",
            )
    for key in ("nodes", "ntasks_per_node"):
        if opts.get(key, 1) != 1:
            raise ConfigError(
                f"launcher.slurm.{key}",
                opts[key],
                "must be 1; more workers: launcher.workers, ranks: launcher.ranks_per_worker",
            )
    for key, value, least in (
        ("launcher.cpus_per_worker", launcher["cpus_per_worker"], 1),
        ("launcher.gpus_per_worker", launcher["gpus_per_worker"], 0),
        ("launcher.slurm.array_parallelism", opts.get("array_parallelism", 1), 1),
        ("launcher.slurm.max_num_timeout", ctor.get("max_num_timeout", 0), 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(key, value, f"a whole number >= {least}")

    # --requeue: `scontrol requeue` (submitit's, or an admin's) works even where the cluster's
    # JobRequeue default is 0, and a node failure requeues the worker instead of failing it.
    # `requeue: false` drops it.
    extra = {"requeue": True, **(extra or {})}
    opts["additional_parameters"] = {k: v for k, v in extra.items() if v not in (False, None)}
    params = {
        "job_name": f"bln-{sweep}",
        "array_parallelism": launcher["workers"],
        **opts,
        "time": minutes,
        "cpus_per_task": launcher["cpus_per_worker"],
    }
    if launcher["gpus_per_worker"]:
        params["gpus_per_node"] = launcher["gpus_per_worker"]
    from launchers.submit import ranks_per_worker

    if ranks_per_worker(launcher) > 1:  # one task per rank; submitit runs the worker in each
        params["ntasks_per_node"] = ranks_per_worker(launcher)
    try:  # submitit's own check of every value (what update_parameters runs)
        submitit.slurm.slurm._make_sbatch_string(command="true", folder="/tmp", **params)
    except Exception as e:
        raise ConfigError("launcher.slurm", given, f"rejected by submitit: {e}") from None
    return params, ctor


def partition_limits(partition: str | None) -> dict[str, Any] | None:
    """What `sinfo` says about a partition (its default one when None): name, max_minutes
    (None = unlimited), mem_mb and cpus of its biggest node, gpus; None when sinfo cannot
    answer quickly (then SLURM checks at submission)."""
    if shutil.which("sinfo") is None:
        return None
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-o", "%P|%l|%m|%c|%G"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    rows = [line.split("|") for line in out.stdout.splitlines() if line.count("|") == 4]
    names = sorted({r[0].rstrip("*") for r in rows})
    if partition is None:
        default = [r[0].rstrip("*") for r in rows if r[0].endswith("*")]
        if not default:
            return None
        partition = default[0]
    if partition not in names:
        raise ConfigError(
            "launcher.slurm.partition", partition, f"valid partitions: {', '.join(names)}"
        )
    mine = [r for r in rows if r[0].rstrip("*") == partition]
    try:
        max_minutes = slurm_minutes(mine[0][1])
    except ValueError:
        max_minutes = None
    gpus = 0
    for r in mine:
        for gres in r[4].split(","):
            m = re.match(r"gpu(?::[^:(]+)?:(\d+)", gres)
            gpus = max(gpus, int(m.group(1)) if m else 0)
    return {
        "name": partition,
        "max_minutes": max_minutes,
        "mem_mb": max(float(r[2].rstrip("+")) for r in mine if r[2].rstrip("+").isdigit()),
        "cpus": max(int(r[3].rstrip("+")) for r in mine if r[3].rstrip("+").isdigit()),
        "gpus": gpus,
    }


def check_sweep_dir(sweep_dir: Path) -> None:
    """The job logs live under the sweep directory, and SLURM cannot write to every path: it
    drops backslashes from #SBATCH values and expands `%` patterns in log file names."""
    sweep_dir = Path(sweep_dir)
    for key, part in (("sweep.name", sweep_dir.name), ("sweep.dir", str(sweep_dir.parent))):
        bad = sorted({c for c in part if c in "\\%" or not c.isprintable()})
        if bad:
            raise ConfigError(
                key, part, f"SLURM log paths cannot hold {''.join(bad)!r}; pick another name"
            )


def check(launcher: dict[str, Any], sweep_dir: Path | None = None) -> dict:
    """Everything SLURM would refuse, before a sweep is created: bad or unknown parameters, a
    sweep directory SLURM cannot log to, no sbatch/srun here, and (when sinfo answers) requests
    over the partition's limits."""
    params, ctor = settings(launcher)
    if sweep_dir is not None:
        check_sweep_dir(sweep_dir)
    for tool in ("sbatch", "srun"):
        if shutil.which(tool) is None:
            raise ConfigError(
                "launcher",
                "slurm",
                f"no `{tool}` on PATH: run on a SLURM login node"
                " (or start a local cluster: launchers/scripts/slurm-up.sh)",
            )
    part = partition_limits(params.get("partition"))
    if part is None:
        return params
    where = f"partition {part['name']!r}"
    if part["max_minutes"] is not None and params["time"] > part["max_minutes"]:
        raise ConfigError(
            "launcher.timeout_min",
            params["time"],
            f"over the MaxTime of {where}: {part['max_minutes']:g} min",
        )
    if "mem" in params and mem_megabytes(params["mem"]) > part["mem_mb"]:
        given = launcher["slurm"] or {}
        key = "mem_gb" if given.get("mem_gb") is not None else "mem"
        raise ConfigError(
            f"launcher.slurm.{key}", given[key], f"over the {part['mem_mb']:g} MB nodes of {where}"
        )
    if params["cpus_per_task"] > part["cpus"]:
        raise ConfigError(
            "launcher.cpus_per_worker",
            params["cpus_per_task"],
            f"over the {part['cpus']} CPUs per node of {where}",
        )
    if params.get("gpus_per_node", 0) > part["gpus"]:
        raise ConfigError(
            "launcher.gpus_per_worker",
            params["gpus_per_node"],
            f"{where} has {part['gpus']} GPU(s) per node",
        )
    return params


def with_env(params: dict, env: dict[str, str] | None) -> dict:
    """`env` exported in the batch script before the user's setup lines."""
    exports = [f"export {k}={shlex.quote(v)}" for k, v in (env or {}).items()]
    return {**params, "setup": exports + list(params.get("setup") or [])} if exports else params


def sbatch_script(
    launcher: dict[str, Any], folder: Path, sweep: str, python: str, env: dict | None = None
) -> str:
    """The sbatch script submitit writes for a sweep's job array (golden tests, --dry-run)."""
    params, ctor = settings(launcher, sweep)
    params = with_env(params, env)
    python = ctor.get("python", shlex.quote(python))  # a `python` setting is a shell command
    command = f"{python} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    return submitit.slurm.slurm._make_sbatch_string(
        command=command, folder=folder, map_count=launcher["workers"], **params
    )


def submit(
    sweep_dir: Path, launcher: dict[str, Any], first_id: int = 0, env: dict[str, str] | None = None
) -> list:
    """Submit `launcher.workers` workers as one job array; returns submitit's SlurmJobs. `env`
    is exported in the batch script before the user's setup lines (the frozen-code snapshot)."""
    sweep_dir = Path(sweep_dir).resolve()
    check_sweep_dir(sweep_dir)
    params, ctor = settings(launcher, sweep_dir.name)
    params = with_env(params, env)
    ex = submitit.AutoExecutor(
        folder=sweep_dir / "jobs" / "%j",
        cluster="slurm",
        **{f"slurm_{k}": v for k, v in ctor.items()},
    )
    ex.update_parameters(**{f"slurm_{k}": v for k, v in params.items()})
    n = launcher["workers"]
    ids = list(range(first_id, first_id + n))
    jobs = ex.map_array(WorkerJob(), [str(sweep_dir)] * n, ids)
    for job in jobs:
        job._cancel_at_deletion = False  # workers outlive a detached or killed driver
    return jobs


class WorkerJob(submitit.helpers.Checkpointable):
    """`bln_sweeps.sweep.worker.worker_main` as a requeueable submitit job.

    submitit calls `checkpoint` and requeues on its preemption signal (SIGUSR2 in submitit
    1.5, `SUBMITIT_PREEMPT_SIGNAL`); the trainer only checkpoints on SIGTERM/SIGUSR1. The relay
    below passes the preemption signal to the running trainer and requeues once the trainer has
    saved, so a requeued job resumes from that checkpoint instead of losing the step in flight.
    Between trials there is nothing to save and submitit requeues at once.
    """

    def __call__(self, sweep_dir: str, worker_id: int) -> int:
        import signal
        import time

        from bln_sweeps.checkpoint import Preempted, StopSignals
        from bln_sweeps.sweep.worker import worker_main

        preempt = submitit.JobEnvironment._usr_sig()
        requeue = signal.getsignal(preempt)  # submitit's checkpoint-and-requeue handler
        requeue = requeue if callable(requeue) else None

        # In a job of several tasks (a trial on several ranks) every task gets the signal, and
        # rank 0 alone requeues, after it saved: a requeue from another rank would kill rank 0
        # before its checkpoint. RANK is set by worker_main from submitit's job environment.
        def rank0() -> bool:
            return os.environ.get("RANK", "0") == "0"

        def relay(signum, frame):
            trainer = signal.getsignal(signal.SIGUSR1)
            if isinstance(getattr(trainer, "__self__", None), StopSignals):
                trainer(signum, frame)  # checkpoint after this step, then Preempted
            elif requeue is not None and rank0():
                requeue(signum, frame)  # checkpoint() + scontrol requeue + exit

        signal.signal(preempt, relay)
        try:
            return worker_main(sweep_dir, worker_id)
        except Preempted as e:
            if e.signum == preempt and requeue is not None and rank0():
                requeue(e.signum, None)  # exits: requeued, or UncompletedJobError past the limit
            # SIGTERM: SLURM requeues (scontrol requeue, preemption) or ends (scancel) the job
            # itself. submitit's own preemption test sends SIGTERM and then SIGUSR2: give that
            # signal a moment to arrive (relay requeues), then leave without a result so that a
            # requeued run is not mistaken for a finished one.
            deadline = time.time() + 3
            while time.time() < deadline:
                time.sleep(0.1)
            raise SystemExit(f"worker {worker_id}: {e}") from None
