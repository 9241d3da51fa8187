"""launcher=slurm: sbatch parameters, checks, GPU pinning and the job array on a real cluster.

Unmarked tests run everywhere (no cluster needed): golden sbatch script, parameter typos,
time/memory checks, local GPU pinning, override values with shell metacharacters, secrets.
`@pytest.mark.slurm` tests run against a real SLURM cluster: `pytest -m slurm` starts one on this
machine with launchers/scripts/slurm-up.sh when `sbatch` is missing (root needed), or skips.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bln_sweeps.config import ConfigError
from launchers import slurm, snapshot
from launchers.submit import gpu_assignment, visible_gpus
from tests.conftest import service_missing

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden"
SCRIPTS = ROOT / "launchers" / "scripts"
SECRETS = {
    "BLN_TEST_API_TOKEN": "tok-9f8e7d6c5b4a",
    "BLN_TEST_SECRET_KEY": "key-0a1b2c3d4e5f",
    "BLN_TEST_DB_PASSWORD": "pw-5e6f7a8b9c0d",
}
EVIL = "x; touch owned-1 $(touch owned-2) `touch owned-3` 'q\" \\ && touch owned-4"


def launcher(**slurm_opts):
    base = {"name": "slurm", "workers": 3, "timeout_min": 90, "gpus_per_worker": 2}
    return {**base, "cpus_per_worker": 16, "slurm": slurm_opts}


# ---- sbatch script: golden file -------------------------------------------------------------

GOLDEN_LAUNCHER = launcher(
    partition="gpu",
    account="proj-42",
    qos="high",
    mem_gb=64,
    constraint="h100|a100",
    setup=["module load cuda/12.4", "export OMP_NUM_THREADS=8"],
    additional_parameters={"reservation": "sweep week", "mail-type": "END"},
    array_parallelism=2,
    signal_delay_s=120,
    max_num_timeout=10,
)


def test_sbatch_script_matches_golden_file():
    """The whole sbatch text of a 3-worker array for a fixed parameter set. Regenerate after a
    deliberate change with UPDATE_GOLDEN=1."""
    if os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2") != "USR2":
        pytest.skip("SUBMITIT_PREEMPT_SIGNAL changes the --signal line")
    text = slurm.sbatch_script(
        GOLDEN_LAUNCHER, Path("/sweeps/demo/jobs/%j"), "demo", "/usr/bin/python3"
    )
    path = GOLDEN / "slurm_array.sbatch"
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


def test_every_submitit_parameter_is_reachable_and_listed_in_the_yaml():
    import submitit
    from omegaconf import OmegaConf

    yaml = OmegaConf.load(ROOT / "conf" / "launcher" / "slurm.yaml")
    assert sorted(yaml.slurm) == slurm.valid_names()
    owned = set(slurm.OWNED)
    assert submitit.SlurmExecutor._valid_parameters() <= set(slurm.valid_names()) | owned


def test_launcher_fields_map_to_submitit_names():
    params, ctor = slurm.settings(GOLDEN_LAUNCHER, "demo")
    assert params["time"] == 90 and params["cpus_per_task"] == 16
    assert params["gpus_per_node"] == 2 and params["mem"] == "64GB"
    assert params["job_name"] == "bln-demo" and params["signal_delay_s"] == 120
    assert ctor == {"max_num_timeout": 10}  # constructor argument, not an sbatch parameter
    cpu, _ = slurm.settings({**launcher(), "gpus_per_worker": 0})
    assert "gpus_per_node" not in cpu and cpu["array_parallelism"] == 3


# ---- errors for people: one line, the key, the value, the valid choices -------------------


def test_parameter_typo_lists_the_valid_names():
    with pytest.raises(ConfigError) as e:
        slurm.settings(launcher(partiton="gpu"))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("launcher.slurm.partiton='gpu'")
    assert "partition" in msg and "additional_parameters" in msg and "max_num_timeout" in msg


@pytest.mark.parametrize(
    "key, owner",
    [("time", "timeout_min"), ("cpus_per_task", "cpus_per_worker"), ("gpus_per_node", "gpus")],
)
def test_parameters_owned_by_the_launcher_point_there(key, owner):
    with pytest.raises(ConfigError, match=f"launcher.slurm.{key}=.*launcher.{owner}"):
        slurm.settings(launcher(**{key: 5}))


def test_typo_through_the_cli_is_one_line_exit_2(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "launchers", "--dry-run", "launcher=slurm"]
        + ["+launcher.slurm.acount=proj", "norm=layernorm", "batch=b4"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "launcher.slurm.acount" in lines[0] and "account" in lines[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "text, minutes",
    [
        ("90", 90),
        ("1:30", 1.5),
        ("2:00:00", 120),
        ("1-0", 1440),
        ("1-2:30", 1590),
        ("2-00:00:00", 2880),
        ("infinite", None),
        ("UNLIMITED", None),
    ],
)
def test_slurm_time_formats(text, minutes):
    assert slurm.slurm_minutes(text) == minutes


@pytest.mark.parametrize("text", ["", "1h", "1:2:3:4", "a-1", "-5", "1.5"])
def test_unparsable_slurm_times_are_rejected(text):
    with pytest.raises(ValueError):
        slurm.slurm_minutes(text)


@pytest.mark.parametrize(
    "change, key",
    [
        ({"timeout_min": 0}, "launcher.timeout_min"),
        ({"timeout_min": -5}, "launcher.timeout_min"),
        ({"timeout_min": "2:00:00"}, "launcher.timeout_min"),
        ({"timeout_min": 1.5}, "launcher.timeout_min"),
        ({"slurm": {"signal_delay_s": 0}}, "launcher.slurm.signal_delay_s"),
        ({"timeout_min": 2, "slurm": {"signal_delay_s": 120}}, "launcher.slurm.signal_delay_s"),
        ({"slurm": {"mem": "0"}}, "launcher.slurm.mem"),
        ({"slurm": {"mem": "-4G"}}, "launcher.slurm.mem"),
        ({"slurm": {"mem": "1.5G"}}, "launcher.slurm.mem"),
        ({"slurm": {"mem": "16X"}}, "launcher.slurm.mem"),
        ({"slurm": {"mem_per_cpu": "lots"}}, "launcher.slurm.mem_per_cpu"),
        ({"slurm": {"mem_gb": 0}}, "launcher.slurm.mem_gb"),
        ({"slurm": {"mem_gb": -1}}, "launcher.slurm.mem_gb"),
        ({"slurm": {"mem_gb": 8, "mem": "8G"}}, "launcher.slurm.mem_gb"),
        ({"slurm": {"setup": "module load cuda"}}, "launcher.slurm.setup"),
        ({"slurm": {"nodes": 2}}, "launcher.slurm.nodes"),
        ({"slurm": {"max_num_timeout": -1}}, "launcher.slurm.max_num_timeout"),
        ({"slurm": {"array_parallelism": 0}}, "launcher.slurm.array_parallelism"),
        ({"cpus_per_worker": 0}, "launcher.cpus_per_worker"),
        ({"gpus_per_worker": -1}, "launcher.gpus_per_worker"),
        ({"slurm": {"additional_parameters": "x"}}, "launcher.slurm.additional_parameters"),
    ],
)
def test_time_and_memory_slurm_would_reject(change, key):
    with pytest.raises(ConfigError) as e:
        slurm.settings({**launcher(), **change})
    assert str(e.value).startswith(f"{key}=") and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "mem, mb", [("16G", 16384), ("16000", 16000), ("2GB", 2048), ("1t", 1048576)]
)
def test_memory_sizes_slurm_accepts(mem, mb):
    assert slurm.mem_megabytes(mem) == mb
    assert slurm.settings(launcher(mem=mem))[0]["mem"] == mem


def test_no_sbatch_on_path_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no sbatch, srun or sinfo
    with pytest.raises(ConfigError, match="no `sbatch` on PATH"):
        slurm.check(launcher())
    with pytest.raises(ConfigError, match="partiton"):  # typos still come first
        slurm.check(launcher(partiton="gpu"))


# ---- local GPU pinning --------------------------------------------------------------------


@pytest.mark.parametrize(
    "env, workers, per, expected",
    [
        ("3,5,7,9", 2, 2, [[3, 5], [7, 9]]),
        ("0,1,2,3", 4, 1, [[0], [1], [2], [3]]),
        ("6", 3, 0, [[], [], []]),
        ("", 2, 0, [[], []]),
    ],
)
def test_gpu_assignment_from_cuda_visible_devices(monkeypatch, env, workers, per, expected):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", env)
    assert visible_gpus() == [int(x) for x in env.split(",") if x]
    sets = gpu_assignment(workers, per, visible_gpus())
    assert sets == expected
    flat = [g for s in sets for g in s]
    assert len(flat) == len(set(flat))  # never the same GPU for two workers


def test_gpu_assignment_needs_enough_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    with pytest.raises(ConfigError, match="launcher.workers=2: needs 4 GPUs"):
        gpu_assignment(2, 2, visible_gpus())


def test_local_workers_see_only_their_own_gpus(monkeypatch, tmp_path):
    """What a local worker process actually sees: submitit's LocalExecutor with the parameters
    launchers.submit passes for each worker."""
    import submitit

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,7,9")
    seen = []
    for worker_gpus in gpu_assignment(2, 2, visible_gpus()):
        ex = submitit.LocalExecutor(folder=tmp_path / "%j")
        ex.update_parameters(
            timeout_min=2, gpus_per_node=len(worker_gpus), visible_gpus=worker_gpus
        )
        seen.append(ex.submit(os.getenv, "CUDA_VISIBLE_DEVICES"))  # read in the job process
    assert [job.result() for job in seen] == ["3,5", "7,9"]


# ---- values never pass through a shell; secrets never reach scripts or logs ----------------


def test_shell_metacharacters_arrive_verbatim_and_never_run(tmp_path, monkeypatch):
    """A value full of shell syntax travels in submitit's pickle to a real job process and comes
    back unchanged; in the sbatch script the sweep's folder is one quoted word."""
    import submitit

    monkeypatch.chdir(tmp_path)
    ex = submitit.LocalExecutor(folder=tmp_path / "jobs" / "%j")
    ex.update_parameters(timeout_min=2)
    assert ex.submit(str, EVIL).result() == EVIL  # str(x) in the job process
    evil_dir = tmp_path / EVIL.replace("/", "_") / "jobs" / "%j"
    text = slurm.sbatch_script(launcher(comment=EVIL), evil_dir, EVIL, sys.executable)
    command = text.strip().splitlines()[-1]
    assert shlex.split(command)[-1] == str(evil_dir)
    sbatch_flags = [line for line in text.splitlines() if line.startswith("#SBATCH --comment=")]
    assert shlex.split(sbatch_flags[0].split("=", 1)[1]) == [EVIL]
    assert not list(tmp_path.rglob("owned-*"))


def test_no_secrets_in_sbatch_scripts(monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    text = slurm.sbatch_script(GOLDEN_LAUNCHER, Path("/s/jobs/%j"), "demo", sys.executable)
    assert not [v for v in SECRETS.values() if v in text]


# ---- a real cluster -------------------------------------------------------------------------


def _cluster_state() -> str:
    if shutil.which("sinfo") is None:
        return "no sinfo"
    p = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    return p.stdout.strip() if p.returncode == 0 else (p.stderr.strip() or "sinfo failed")


@pytest.fixture(scope="session")
def slurm_cluster():
    """A SLURM cluster that answers: the one on PATH, else one started on this machine."""
    state = _cluster_state() if shutil.which("sbatch") else "no sbatch on PATH"
    if not any(s in state for s in ("idle", "mixed", "alloc")):
        if os.geteuid() != 0:
            service_missing(f"no SLURM cluster ({state}) and not root to start one")
        p = subprocess.run(
            [str(SCRIPTS / "slurm-up.sh")], capture_output=True, text=True, timeout=600
        )
        if p.returncode != 0:
            tail = (p.stderr or p.stdout).strip().splitlines()[-1:]
            service_missing(f"could not start SLURM with slurm-up.sh: {' '.join(tail)}")
    return slurm.partition_limits(None)


def test_sweep_dirs_slurm_cannot_log_to_are_rejected():
    slurm.check_sweep_dir(Path("/tmp/sweeps") / "ok; $(x) 'q\" & ` name")  # quoted fine
    for name in ("back\\slash", "50%off", "new\nline"):
        with pytest.raises(ConfigError, match="sweep.name=.*SLURM log paths cannot hold"):
            slurm.check_sweep_dir(Path("/tmp/sweeps") / name)


@pytest.mark.slurm
def test_requests_over_the_partition_limits_are_rejected(slurm_cluster):
    """Against what sinfo reports (slurm-up.sh's `short` partition has MaxTime=30)."""
    try:
        short = slurm.partition_limits("short")
    except ConfigError:
        service_missing("this cluster has no partition `short` (start it with slurm-up.sh)")
    cpu = {**launcher(partition="short"), "gpus_per_worker": 0, "cpus_per_worker": 1}
    slurm.check({**cpu, "timeout_min": int(short["max_minutes"])})
    cases = [
        ({"timeout_min": int(short["max_minutes"]) + 1}, "launcher.timeout_min=", "MaxTime"),
        ({"cpus_per_worker": short["cpus"] + 1}, "launcher.cpus_per_worker=", "CPUs per node"),
        ({"gpus_per_worker": short["gpus"] + 1}, "launcher.gpus_per_worker=", "GPU(s) per node"),
        ({"slurm": {"partition": "short", "mem_gb": 10**6}}, "launcher.slurm.mem_gb=", "MB nodes"),
        ({"slurm": {"partition": "nowhere"}}, "launcher.slurm.partition=", "valid partitions"),
    ]
    for change, key, why in cases:
        with pytest.raises(ConfigError) as e:
            slurm.check({**cpu, "timeout_min": 10, **change})
        assert str(e.value).startswith(key) and why in str(e.value), str(e.value)


# ---- sweeps through a real cluster ------------------------------------------------------------

SLURM_ARGS = [
    "launcher=slurm",
    "launcher.gpus_per_worker=0",
    "launcher.cpus_per_worker=1",
    "launcher.timeout_min=10",
    "launcher.slurm.signal_delay_s=60",
]


def hydra_quote(value: str) -> str:
    """A Hydra override value that parses back to `value` exactly: Hydra unescapes a backslash
    only before a quote or at the end of a quoted string."""
    import re

    value = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
    value = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, value)
    return f"'{value}'"


def accounting(array: str) -> list[str]:
    """`sacct`'s job ids and states of a job array's tasks, as one flat list of words."""
    out = subprocess.run(
        ["sacct", "-n", "-X", "-j", array, "-o", "JobID%20,State%20"],
        capture_output=True,
        text=True,
    )
    return out.stdout.split()


def wait_for(what: str, predicate, timeout_s: float = 180.0, every_s: float = 0.2):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def trials(sweep_dir: Path) -> list:
    import optuna

    from bln_sweeps.sweep.manifest import load_manifest
    from bln_sweeps.sweep.space import open_storage

    m = load_manifest(sweep_dir)
    storage = open_storage(m["storage_url"], sweep_dir)
    return [
        t
        for name in optuna.get_all_study_names(storage)
        for t in optuna.load_study(study_name=name, storage=storage).get_trials()
    ]


def job_ids(sweep_dir: Path) -> list[str]:
    return [j["job_id"] for j in json.loads((sweep_dir / "manifest.json").read_text())["jobs"]]


def in_queue(job_id: str) -> bool:
    p = subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True)
    return bool(p.stdout.strip())


@pytest.fixture
def cancel_leftovers():
    """Cancel what a failed test left in the queue (by job id, from its manifest)."""
    dirs = []
    yield dirs.append
    for d in dirs:
        if (d / "manifest.json").exists():
            ids = job_ids(d)
            if ids:
                subprocess.run(["scancel", *ids], capture_output=True)


@pytest.mark.slurm
def test_sweep_runs_as_one_job_array(slurm_cluster, tmp_path, cancel_leftovers):
    """A real sweep through sbatch: both workers in one array, every budget spent. Shell syntax
    in the sweep's directory (sbatch script, log paths, store URIs) and in an override value
    arrives verbatim and never runs; no secret from the submitting environment lands in any file
    of the sweep (sbatch script, job logs, manifest, stores)."""
    from tests.test_sweep import FAST, assert_complete, bln_sweep, sweep_facts

    name = "arr"
    sweep_dir = tmp_path / "dir; touch owned-5 $(touch owned-6) 'q\" && touch owned-7" / name
    cancel_leftovers(sweep_dir)
    t0 = time.time()
    p = bln_sweep(
        "norm=layernorm,rmsnorm",
        "batch=b4",
        f"sweep.dir={hydra_quote(str(sweep_dir.parent))}",
        f"sweep.name={name}",
        f"data.path={hydra_quote(EVIL)}",
        "search.n_trials=2",
        "search.confirm_seeds=1",
        "search.pruner=none",
        "launcher.workers=2",
        *SLURM_ARGS,
        *FAST,
        cwd=tmp_path,
        env={**os.environ, **SECRETS},
        timeout=300,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    print(f"sweep through SLURM: {time.time() - t0:.1f} s")
    facts = sweep_facts(sweep_dir)
    assert_complete(facts, n_trials=2, confirm_seeds=1)
    ids = job_ids(sweep_dir)
    array = ids[0].split("_")[0]
    assert ids == [f"{array}_0", f"{array}_1"]  # one array, one task per worker
    # the sweep is over when its cells are; a worker task may still be exiting then
    wait_for("both array tasks COMPLETED", lambda: accounting(array).count("COMPLETED") == 2, 60)
    # the script sbatch ran is the one the golden test pins down
    (script,) = sweep_dir.rglob("*_submission.sh")
    m = json.loads((sweep_dir / "manifest.json").read_text())
    folder = sweep_dir.resolve() / "jobs" / "%j"
    (code,) = (sweep_dir / "code").iterdir()  # the frozen-code snapshot the jobs import
    env = snapshot.job_env(code)
    assert f"export PYTHONPATH={shlex.quote(str(code))}" in script.read_text()
    assert script.read_text() == slurm.sbatch_script(
        m["launcher"], folder, name, sys.executable, env
    )
    # values with shell syntax: verbatim in every run's config, nothing executed
    runs = [r for r in facts["runs"] if r.data.tags.get("kind") in ("trial", "confirm")]
    assert runs and all(r.data.params["data.path"] == EVIL for r in runs)
    assert {r.data.tags.get("slurm.array_job_id") for r in runs} == {array}
    assert not list(tmp_path.rglob("owned-*")) and not list(ROOT.glob("owned-*"))
    # secrets of the submitting environment: in no file the sweep wrote
    leaked = [
        f
        for f in tmp_path.rglob("*")
        if f.is_file() and any(v.encode() in f.read_bytes() for v in SECRETS.values())
    ]
    assert not leaked, leaked


@pytest.mark.slurm
@pytest.mark.parametrize("how", ["preempt", "requeue"])
def test_interrupted_worker_is_requeued_and_resumes_the_same_trial(
    slurm_cluster, tmp_path, cancel_leftovers, how
):
    """`preempt`: SLURM's checkpoint signal (scancel --signal=USR2, what submitit asks SLURM to
    send before the time limit): the trainer saves, submitit requeues the array task. `requeue`:
    a bare `scontrol requeue` (SIGTERM, SLURM restarts the task). Either way the requeued task
    resumes the same Optuna trial in the same MLflow run from a checkpoint, never from scratch,
    and ends with exactly the validation loss of an uninterrupted run."""
    from bln_sweeps.compose import compose
    from bln_sweeps.config import to_run_config, validate
    from bln_sweeps.sweep.manifest import load_manifest
    from bln_sweeps.sweep.trial_config import trial_overrides
    from bln_sweeps.train import run
    from launchers.queue import live_jobs, reattach
    from tests.test_sweep import FAST, bln_sweep, sweep_facts

    sweep_dir = tmp_path / "sweeps" / how
    cancel_leftovers(sweep_dir)
    t0 = time.time()
    p = bln_sweep(
        "norm=layernorm",
        "batch=b4",
        f"sweep.name={how}",
        "search.n_trials=1",
        "search.confirm_seeds=0",
        "search.pruner=none",
        "launcher.workers=1",
        *SLURM_ARGS,
        *FAST,
        "train.steps=40",
        "train.eval_interval=20",
        "train.checkpoint_interval=4",
        "--detach",
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    (job,) = job_ids(sweep_dir)
    entries = json.loads((sweep_dir / "manifest.json").read_text())["jobs"]
    (live,) = live_jobs(entries)  # what a rerun would reattach to instead of resubmitting
    assert reattach(sweep_dir, [live])[0].job_id == job

    def checkpointed():
        running = [t for t in trials(sweep_dir) if t.state.name == "RUNNING"]
        return running and (Path(running[0].user_attrs["run_dir"]) / "ckpt.pt").exists()

    wait_for("a running trial with a checkpoint", checkpointed)
    t_signal = time.time()
    if how == "preempt":
        subprocess.run(["scancel", "--signal=USR2", job], check=True)
    else:
        subprocess.run(["scontrol", "requeue", job], check=True)
    wait_for("the job to end", lambda: not in_queue(job) and trials(sweep_dir), timeout_s=240)
    print(
        f"{how}: submit->signal {t_signal - t0:.1f} s, signal->done {time.time() - t_signal:.1f} s"
    )

    assert live_jobs(entries) == []
    show = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    assert "Restarts=1" in show and "JobState=COMPLETED" in show, show
    (trial,) = trials(sweep_dir)  # the same trial, never a second one
    assert trial.number == 0 and trial.state.name == "COMPLETE", trial
    assert trial.user_attrs.get("preempted") == 1
    facts = sweep_facts(sweep_dir)
    (mlrun,) = [r for r in facts["runs"] if r.data.tags.get("kind") == "trial"]  # one MLflow run
    assert mlrun.info.run_id == trial.user_attrs["mlflow_run_id"]
    assert mlrun.info.status == "FINISHED"
    assert int(mlrun.data.tags["resumed_from_step"]) >= 4  # from a checkpoint, not from scratch
    assert mlrun.data.tags["slurm.restart_count"] == "1"

    m = load_manifest(sweep_dir)
    cfg = validate(
        to_run_config(
            compose(trial_overrides(m, m["cells"][0], trial.params, m["base_seed"]), "sweep")
        )
    )
    cfg.tracking.enabled = False
    uninterrupted = run(cfg, run_dir=tmp_path / "uninterrupted")
    assert trial.value == uninterrupted[m["search"]["metric"]]


# ---- hostile values: every value stays on its own #SBATCH line -------------------------------

HOSTILE = "ok'\"; touch owned #$(id) `id` \\ \u00e9"
HOSTILE_LAUNCHER = launcher(
    partition="gpu",
    comment=HOSTILE,
    constraint="a|b&c",
    additional_parameters={"mail-user": HOSTILE, "reservation": "r #x"},
    setup=["echo one line"],
)


def sbatch_block(text: str) -> list[str]:
    """The lines between `# Parameters` and the first blank line: sbatch reads #SBATCH options
    only until the first command line, so every one of them must be an #SBATCH line."""
    lines = text.splitlines()
    start = lines.index("# Parameters") + 1
    return lines[start : lines.index("", start)]


def test_hostile_values_match_the_golden_file_and_stay_on_their_line():
    text = slurm.sbatch_script(
        HOSTILE_LAUNCHER, Path("/sweeps/demo/jobs/%j"), "demo", "/usr/bin/python3"
    )
    path = GOLDEN / "slurm_array_hostile.sbatch"
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()
    block = sbatch_block(text)
    assert all(line.startswith("#SBATCH --") for line in block), block
    comment = next(line for line in block if line.startswith("#SBATCH --comment="))
    assert shlex.split(comment.split("=", 1)[1]) == [HOSTILE]


@pytest.mark.parametrize(
    "opts, key",
    [
        ({"comment": "ok\ntouch X #"}, "launcher.slurm.comment"),
        ({"partition": "gpu\r"}, "launcher.slurm.partition"),
        ({"account": "a\x00b"}, "launcher.slurm.account"),
        ({"qos": "high\u2028x"}, "launcher.slurm.qos"),  # a Unicode line separator
        ({"setup": ["module load x", "a\nb"]}, "launcher.slurm.setup"),
        ({"srun_args": ["--x\t"]}, "launcher.slurm.srun_args"),
        ({"additional_parameters": {"mail-type": "END\nx"}}, "mail-type"),
        ({"additional_parameters": {"x\ny": "1"}}, "launcher.slurm.additional_parameters"),
        ({"additional_parameters": {"x y": "1"}}, "additional_parameters.x y"),
        ({"additional_parameters": {"--x": "1"}}, "additional_parameters.--x"),
        ({"additional_parameters": {"a=b": "1"}}, "additional_parameters.a=b"),
    ],
)
def test_control_characters_and_odd_option_names_are_rejected(opts, key):
    with pytest.raises(ConfigError) as e:
        slurm.settings(launcher(**opts))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("launcher.slurm.") and key in msg, msg


@pytest.mark.slurm
def test_two_task_trial_is_preempted_and_resumes(slurm_cluster, tmp_path, cancel_leftovers):
    """A worker job of 2 SLURM tasks (launcher.ranks_per_worker=2, gloo on CPU) trains its trial
    as 2 DDP ranks; SLURM's checkpoint signal (USR2) reaches the tasks, both stop after the same
    step, rank 0 saves, submitit requeues the job and both ranks resume the same trial in the
    same MLflow run from that checkpoint."""
    from tests.test_sweep import FAST, bln_sweep, sweep_facts

    sweep_dir = tmp_path / "sweeps" / "ddp"
    cancel_leftovers(sweep_dir)
    p = bln_sweep(
        "norm=bln",
        "norm.options.sync=global",
        "batch=b4",
        "sweep.name=ddp",
        "search.n_trials=1",
        "search.confirm_seeds=0",
        "search.pruner=none",
        "launcher.workers=1",
        "launcher.ranks_per_worker=2",
        *SLURM_ARGS,
        *FAST,
        "train.steps=24",
        "train.eval_interval=12",
        "train.checkpoint_interval=4",
        "--detach",
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    (job,) = job_ids(sweep_dir)

    def checkpointed():
        running = [t for t in trials(sweep_dir) if t.state.name == "RUNNING"]
        return running and (Path(running[0].user_attrs["run_dir"]) / "ckpt.pt").exists()

    # generous limits: two ranks start (imports, gloo) twice, on a CI machine shared with others
    wait_for("a running trial with a checkpoint", checkpointed, timeout_s=300)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    wait_for("the job to end", lambda: not in_queue(job) and trials(sweep_dir), timeout_s=600)
    show = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    assert "Restarts=1" in show and "JobState=COMPLETED" in show and "NumTasks=2" in show, show
    (trial,) = trials(sweep_dir)
    assert trial.state.name == "COMPLETE" and trial.user_attrs.get("preempted") == 1, trial
    (mlrun,) = [r for r in sweep_facts(sweep_dir)["runs"] if r.data.tags.get("kind") == "trial"]
    assert mlrun.info.status == "FINISHED" and mlrun.data.tags["n_ranks"] == "2"
    assert int(mlrun.data.tags["resumed_from_step"]) >= 4  # from a checkpoint, not from scratch
    logs = {f.name for f in sweep_dir.rglob("*_log.err")}
    assert any(n.endswith("_0_log.err") for n in logs) and any(
        n.endswith("_1_log.err") for n in logs
    )


@pytest.mark.slurm
def test_stop_cancels_waiting_workers_and_the_same_command_resumes(
    slurm_cluster, tmp_path, cancel_leftovers
):
    """`bln-sweep stop` while one array task trains and the other still waits in the queue
    (array_parallelism=1): the waiting task is cancelled at once and never starts, the running
    trial checkpoints and is queued, and the same command again spends every budget."""
    from launchers.queue import queue_states
    from tests.test_sweep import FAST, assert_complete, bln_sweep, sweep_facts

    args = [
        "norm=layernorm",
        "sweep.grid={batch: b4}",
        "sweep.name=halt",
        "search.n_trials=2",
        "search.confirm_seeds=1",
        "search.pruner=none",
        "launcher.workers=2",
        "launcher.slurm.array_parallelism=1",
        *SLURM_ARGS,
        *[o for o in FAST if not o.startswith("train.steps")],
        "train.steps=100",  # still training when stop arrives
    ]
    sweep_dir = tmp_path / "sweeps" / "halt"
    cancel_leftovers(sweep_dir)
    p = bln_sweep(*args, "--detach", cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    wait_for("a checkpoint", lambda: list(sweep_dir.glob("runs/*/search-*/ckpt.pt")), 300)
    states = queue_states()  # squeue -r: array tasks one by one
    (waiting,) = [j for j in job_ids(sweep_dir) if states.get(j) == "PENDING"]
    (running,) = [j for j in job_ids(sweep_dir) if j != waiting]

    p = bln_sweep("stop", "halt", cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "cancelled 1 worker job(s) still waiting in the SLURM queue" in p.stdout
    assert not in_queue(waiting)
    wait_for("the running task to end", lambda: not in_queue(running), 120)
    assert not list(sweep_dir.rglob(f"{waiting}_*_log.out")), "the cancelled task started"
    queued = [t for t in trials(sweep_dir) if t.user_attrs.get("preempted")]
    assert queued and all(t.state.name == "WAITING" for t in queued), queued

    p = bln_sweep(*args, cwd=tmp_path, timeout=900)  # the same command again
    assert p.returncode == 0, p.stdout + p.stderr
    assert_complete(sweep_facts(sweep_dir), n_trials=2, confirm_seeds=1)
