"""`bln-train -m hydra/launcher=bln_local|bln_slurm` (hydra_plugins/bln_launcher): a plain Hydra
grid, one submitit job per grid point, every run in MLflow; bad launcher settings are one line."""

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_slurm import accounting, slurm_cluster  # noqa: F401  (slurm_cluster: a fixture)
from tests.test_train import bln_train, mlflow_client

GRID = [
    "-m",
    "norm=layernorm,rmsnorm",
    "train.steps=2",
    "train.eval_interval=2",
    "eval.tokens=512",
    "data.n_train_tokens=20000",
    "data.n_val_tokens=5000",
]
SLURM = [
    "hydra/launcher=bln_slurm",
    "hydra.launcher.workers=2",
    "hydra.launcher.gpus_per_worker=0",
    "hydra.launcher.cpus_per_worker=1",
    "hydra.launcher.timeout_min=10",
    "hydra.launcher.slurm.signal_delay_s=60",
]


def grid_in_mlflow(tmp_path: Path, *launcher: str) -> list[str]:
    """Run GRID with `launcher`; check both runs landed in MLflow. Returns the job folders."""
    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    t0 = time.time()
    p = bln_train(*GRID, *launcher, f"tracking.uri={uri}", cwd=tmp_path)
    print(f"bln-train -m {' '.join(launcher)}: {time.time() - t0:.1f} s")
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("finished") == 2, p.stdout  # each job's summary line, echoed
    client = mlflow_client(uri)
    runs = client.search_runs([client.get_experiment_by_name("bln-train").experiment_id])
    assert sorted(r.data.params["norm.name"] for r in runs) == ["layernorm", "rmsnorm"]
    assert {r.data.tags["status"] for r in runs} == {"finished"}
    (submitit,) = tmp_path.glob("multirun/*/*/.submitit")
    logs = sorted(submitit.glob("*/*_log.out"))
    assert len(logs) == 2 and all("completed successfully" in f.read_text() for f in logs)
    return [f.parent.name for f in logs]


def wait_until_gone(job: str, timeout_s: float = 120) -> None:
    """The driver has the results as soon as they are written; the job itself ends after."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if not subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout:
            return
        time.sleep(0.5)


def test_local_grid_runs_each_job_in_its_own_process(tmp_path):
    jobs = grid_in_mlflow(tmp_path, "hydra/launcher=bln_local", "hydra.launcher.workers=2")
    assert len(set(jobs)) == 2  # local job id = the job's process id
    # both ran from the code snapshot taken at submit
    assert len(list(tmp_path.glob("multirun/*/*/code/*/bln_sweeps"))) == 1


@pytest.mark.parametrize(
    "args, key",
    [
        (["hydra/launcher=bln_local", "hydra.launcher.wrokers=2"], "hydra.launcher.wrokers"),
        (["hydra/launcher=bln_local", "hydra.launcher.timeout_min=0"], "hydra.launcher.timeout"),
        (["hydra/launcher=bln_slurm", "hydra.launcher.slurm.partiton=x"], "slurm.partiton"),
        (["hydra/launcher=bln_slurm", "hydra.launcher.slurm.mem=16X"], "slurm.mem"),
    ],
)
def test_bad_launcher_setting_is_one_line_exit_2(args, key, tmp_path):
    p = bln_train(*GRID, *args, cwd=tmp_path)
    assert p.returncode == 2, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], p.stderr
    assert not list(tmp_path.iterdir())  # nothing created: no sweep dir, no store, no job


@pytest.mark.slurm
def test_slurm_grid_runs_as_one_job_array(slurm_cluster, tmp_path):  # noqa: F811
    try:
        jobs = grid_in_mlflow(tmp_path, *SLURM)
    except BaseException:  # a failed test leaves nothing queued
        for d in tmp_path.glob("multirun/*/*/.submitit/*"):
            if d.is_dir():
                subprocess.run(["scancel", d.name], capture_output=True)
        raise
    array = jobs[0].split("_")[0]
    wait_until_gone(array)
    assert sorted(jobs) == [f"{array}_0", f"{array}_1"] and re.fullmatch(r"\d+", array)
    acct = accounting(array)
    assert acct.count("COMPLETED") == 2, acct


@pytest.mark.slurm
def test_slurm_checkpoint_signal_requeues_and_the_run_resumes(slurm_cluster, tmp_path):  # noqa: F811
    """SLURM's checkpoint signal (scancel --signal=USR2, what submitit asks for before the time
    limit): the trainer saves, submitit requeues the array task, the requeued task resumes the
    same MLflow run from the checkpoint, and the driver still collects a finished grid."""
    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    args = [*GRID[:2], "norm=layernorm", *GRID[3:], "train.steps=200", "train.eval_interval=100"]
    args += ["train.checkpoint_interval=4", "train.log_interval=50", f"tracking.uri={uri}"]
    driver = subprocess.Popen(
        [sys.executable, "-m", "bln_sweeps.cli", *args, *SLURM],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    job = None
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not list(tmp_path.glob("runs/*/ckpt.pt")):
            assert driver.poll() is None, driver.communicate()
            time.sleep(0.2)
        (folder,) = [d for d in tmp_path.glob("multirun/*/*/.submitit/*") if d.is_dir()]
        job = folder.name  # one grid point: a plain job, not an array
        subprocess.run(["scancel", "--signal=USR2", job], check=True)
        out, err = driver.communicate(timeout=300)
        assert driver.returncode == 0, out + err
        wait_until_gone(job)
    finally:  # a failed test leaves nothing queued
        if driver.poll() is None:
            driver.kill()
        if job is not None and driver.returncode != 0:
            subprocess.run(["scancel", job], capture_output=True)
    show = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    assert "Restarts=1" in show and "JobState=COMPLETED" in show, show
    client = mlflow_client(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("bln-train").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["status"] == "finished"
    assert int(run.data.tags["resumed_from_step"]) >= 4  # from a checkpoint, not from scratch
