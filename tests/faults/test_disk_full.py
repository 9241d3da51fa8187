"""Case 7: the disk fills while a checkpoint is written.

The run directory is a tmpfs sized to hold one checkpoint and a half: the first periodic save
fits, the second cannot (an atomic save writes the new file next to the old one before it
replaces it). The run stops, the previous checkpoint stays loadable, no temporary file is left,
and once there is room again the same command resumes from that checkpoint and ends exactly
where an undisturbed run ends. Needs root (mount); skipped otherwise.
"""

import os
import subprocess
from pathlib import Path

import pytest

from bln_sweeps.checkpoint import CKPT_NAME, load
from tests.conftest import service_missing
from tests.faults.conftest import cli

STEPS, EVERY = 8, 2
RUN = [
    f"train.steps={STEPS}",
    f"train.checkpoint_interval={EVERY}",
    "train.eval_interval=4",
    "eval.tokens=512",
    "train.log_interval=2",
    "seq.len=64",
    "data.n_train_tokens=30000",
    "data.n_val_tokens=5000",
]


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a tmpfs of that many bytes under tmp_path; unmounted afterwards."""
    if os.geteuid() != 0:
        service_missing("mounting a size-limited tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    mounted = []

    def mount(size: int) -> Path:
        opts = f"size={size // 1024}k" if not mounted else f"remount,size={size // 1024}k"
        p = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)], capture_output=True, text=True
        )
        if p.returncode != 0:
            service_missing(f"cannot mount a tmpfs here: {p.stderr.strip()}")
        mounted.append(size)
        return mnt

    yield mount
    if mounted:
        subprocess.run(["umount", str(mnt)], check=True)


def final_val_loss(uri: str, experiment: str) -> tuple[float, object]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    (run,) = client.search_runs([exp.experiment_id])
    return run.data.metrics["val/loss"], run


def train(tmp_path, out_dir: Path, experiment: str):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = [*RUN, f"train.out_dir={out_dir}", f"tracking.uri={uri}"]
    return cli("bln_sweeps.cli", *args, f"tracking.experiment={experiment}", cwd=tmp_path), uri


def undisturbed(tmp_path) -> tuple[float, int]:
    """The same run on a roomy disk: its final val/loss and checkpoint size."""
    p, uri = train(tmp_path, tmp_path / "roomy", "roomy")
    assert p.returncode == 0, p.stderr
    (ckpt,) = (tmp_path / "roomy").glob(f"*/{CKPT_NAME}")
    return final_val_loss(uri, "roomy")[0], ckpt.stat().st_size


@pytest.mark.slow
def test_full_disk_keeps_the_previous_checkpoint_and_the_run_resumes(tmp_path, small_disk):
    loss, size = undisturbed(tmp_path)
    disk = small_disk(size * 3 // 2)

    p, uri = train(tmp_path, disk, "full")
    assert p.returncode != 0
    assert "No space left on device" in p.stderr
    (run_dir,) = disk.iterdir()
    # no temporary file left behind (mlflow_run_id: the run to continue, written at its start)
    assert sorted(f.name for f in run_dir.iterdir()) == sorted([CKPT_NAME, "mlflow_run_id"])
    state = load(run_dir / CKPT_NAME)
    assert (state["step"], state["status"]) == (EVERY, "running")  # the last save that fitted
    _, run = final_val_loss(uri, "full")
    assert run.info.status == "FAILED" and run.data.tags["status"] == "failed"

    small_disk(64 << 20)  # room again: the same command resumes
    p, _ = train(tmp_path, disk, "full")
    assert p.returncode == 0, p.stderr
    resumed, run = final_val_loss(uri, "full")
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from_step"] == str(EVERY)
    assert resumed == loss  # bitwise: the interruption changed nothing


@pytest.mark.slow
def test_full_disk_error_is_one_clear_line(tmp_path, small_disk):
    _, size = undisturbed(tmp_path)
    disk = small_disk(size * 3 // 2)
    p, _ = train(tmp_path, disk, "full")
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert "could not write checkpoint" in lines[0] and "No space left on device" in lines[0]


@pytest.mark.slow
def test_full_disk_at_the_final_checkpoint_ends_the_run_failed_not_running(tmp_path, small_disk):
    """Only the final checkpoint is written (checkpoint_interval=0) and it does not fit: the
    run used to stay RUNNING (the last save was outside the trainer's error handling)."""
    loss, size = undisturbed(tmp_path)
    disk = small_disk(size // 2)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = [*RUN, "train.checkpoint_interval=0", f"train.out_dir={disk}", f"tracking.uri={uri}"]
    p = cli("bln_sweeps.cli", *args, "tracking.experiment=last", cwd=tmp_path)
    assert p.returncode != 0 and "No space left on device" in p.stderr
    _, run = final_val_loss(uri, "last")
    assert run.info.status == "FAILED" and run.data.tags["status"] == "failed"
    assert "No space left on device" in run.data.tags["status_reason"]

    small_disk(64 << 20)  # room again: the same command ends in the same MLflow run
    p = cli("bln_sweeps.cli", *args, "tracking.experiment=last", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    resumed, again = final_val_loss(uri, "last")
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert resumed == loss


@pytest.mark.slow
def test_a_trial_failed_by_a_full_disk_is_retried_not_spent(tmp_path, small_disk, monkeypatch):
    """A worker's trial hits ENOSPC at its final checkpoint: the trial is failed as retried and
    queued again with its run directory, the budget is not spent, and once there is room the
    retry finishes it in the same MLflow run."""
    from optuna.trial import TrialState

    from bln_sweeps.sweep.budget import budget_state
    from bln_sweeps.sweep.manifest import load_manifest
    from bln_sweeps.sweep.space import open_storage
    from bln_sweeps.sweep.worker import Worker
    from launchers.plan import make_plan
    from launchers.prepare import prepare
    from tests.faults.conftest import FAST, all_trials, assert_sweep_intact

    _, size = undisturbed(tmp_path)
    monkeypatch.chdir(tmp_path)
    plan = make_plan(
        [
            "norm=layernorm",
            "sweep.grid={batch: b4}",
            "sweep.name=full",
            "search.n_trials=1",
            "search.confirm_seeds=0",
            "search.pruner=none",
            "search.params={optim.lr:'choice(1e-3)'}",
            *FAST,
            "train.checkpoint_interval=0",
        ]
    )
    prepare(plan, "bln-sweep (test)")
    disk = small_disk(size // 2)
    (plan.sweep_dir / "runs").symlink_to(disk)  # every run directory of the sweep on the tmpfs

    worker = Worker(plan.sweep_dir)
    (cell,) = load_manifest(plan.sweep_dir)["cells"]
    assert worker.run_trial(cell, "search")
    (failed, retry) = sorted(all_trials(plan.sweep_dir), key=lambda t: t.number)
    assert failed.state == TrialState.FAIL and failed.user_attrs["retried"] is True
    assert "No space left on device" in failed.user_attrs["status_reason"]
    assert retry.state == TrialState.WAITING and retry.user_attrs["run_dir"]
    import optuna

    storage = open_storage(None, plan.sweep_dir)
    study = optuna.load_study(study_name=f"full/{cell['name']}", storage=storage)
    assert budget_state(study, 1)["done"] == 0  # not spent

    small_disk(64 << 20)
    Worker(plan.sweep_dir).run()
    facts = assert_sweep_intact(plan.sweep_dir, n_trials=1, confirm_seeds=0)
    trial_runs = [r for r in facts["runs"] if r.data.tags.get("kind") == "trial"]
    assert len(trial_runs) == 1 and trial_runs[0].info.status == "FINISHED"
