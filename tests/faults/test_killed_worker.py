"""A worker killed between the start of its trial's MLflow run and the trial's first checkpoint.

tests/test_sweep.py kills a worker after its trial checkpointed (case 1): the retry resumes the
checkpoint and, with it, the same MLflow run. Before the first checkpoint there is no
checkpoint, but the run id is kept beside it from the moment the run exists: the retry trains
from step 0 in the same MLflow run, so no run is left RUNNING and none is duplicated. On a real
model that window is every trial's first `train.checkpoint_interval` steps (100 by default).
"""

import os
import signal
import subprocess

import pytest

from tests.faults.conftest import (
    FAST,
    all_trials,
    assert_sweep_intact,
    bln_sweep,
    pids_with,
    ranked,
    stop_leftovers,
    wait_for,
)
from tests.test_slurm import (  # noqa: F401 (fixtures)
    SLURM_ARGS,
    cancel_leftovers,
    in_queue,
    job_ids,
    slurm_cluster,
)


def running_mlflow_run(sweep_dir):
    """The pid of the worker whose trial has a RUNNING MLflow run and no checkpoint yet."""
    from mlflow.tracking import MlflowClient

    from bln_sweeps.sweep.manifest import load_manifest

    trials = all_trials(sweep_dir)
    assert not [t for t in trials if t.state.name == "COMPLETE"], "the trial ended too soon"
    trials = [t for t in trials if t.state.name == "RUNNING"]
    if not trials:
        return None
    client = MlflowClient(tracking_uri=load_manifest(sweep_dir)["tracking_uri"])
    exp = client.get_experiment_by_name("early")
    runs = client.search_runs([exp.experiment_id], "tags.kind = 'trial'") if exp else []
    if not any(r.info.status == "RUNNING" for r in runs):
        return None
    assert not list((sweep_dir / "runs").rglob("ckpt.pt"))
    return trials[0].user_attrs["pid"]


@pytest.mark.slow
def test_worker_killed_before_its_first_checkpoint_leaves_no_run_running(tmp_path):
    args = [
        "norm=layernorm",
        "sweep.grid={batch: b4}",
        "sweep.name=early",
        "search.n_trials=1",
        "search.confirm_seeds=0",
        "search.pruner=none",
        "search.params={optim.lr:'choice(1e-3)'}",
        "launcher.workers=1",
        *[o for o in FAST if not o.startswith(("train.steps", "train.checkpoint_interval"))],
        "train.steps=200",
        "train.checkpoint_interval=0",  # no checkpoint before the end
    ]
    sweep_dir = tmp_path / "sweeps" / "early"
    try:
        p = bln_sweep(*args, "--detach", cwd=tmp_path)
        assert p.returncode == 0, p.stderr
        pid = wait_for(lambda: running_mlflow_run(sweep_dir), "the trial's MLflow run")
        os.kill(pid, signal.SIGKILL)
        p = bln_sweep(*args, cwd=tmp_path)  # the same command again: retries the trial
        assert p.returncode == 0, p.stdout + p.stderr
        wait_for(lambda: not pids_with(str(sweep_dir)), "every worker to exit")
    finally:
        stop_leftovers(str(sweep_dir))
    facts = assert_sweep_intact(sweep_dir, n_trials=1, confirm_seeds=0)
    (retry,) = facts["cells"]["batch=b4"]["search"]
    assert retry.user_attrs["retry_of"] == 0


# ---- kill -9 of a SLURM worker job (scancel -s KILL) on a real cluster -----------------------

KILL_SWEEP = [
    "norm=layernorm",
    "sweep.grid={batch: b4}",
    "search.n_trials=2",
    "search.confirm_seeds=1",
    "search.pruner=none",
    "search.params={optim.lr:'choice(1e-3)'}",
    *[o for o in FAST if not o.startswith("train.steps")],
    "train.steps=100",  # a wide window after the first checkpoint (step 4) to kill the trial in
    "launcher.workers=2",
]


@pytest.mark.slurm
def test_slurm_workers_killed_mid_trial_are_retried_from_their_checkpoints(
    slurm_cluster,  # noqa: F811 (the fixture imported from test_slurm)
    tmp_path,
    cancel_leftovers,  # noqa: F811
):
    """`scancel --signal=KILL` of the sweep's job array as soon as a trial has checkpointed
    (kill -9 of every worker mid-trial), then the same command again: its new workers find the
    trials' processes gone, queue each again with its run directory, and resume it from its
    checkpoint in its MLflow run. No MLflow run twice, none RUNNING, and the table equals the
    one of the same sweep undisturbed."""
    p = bln_sweep(*KILL_SWEEP, "sweep.name=calm", cwd=tmp_path)  # the undisturbed reference
    assert p.returncode == 0, p.stdout + p.stderr
    undisturbed = ranked(tmp_path / "sweeps" / "calm")

    args = [*KILL_SWEEP, *SLURM_ARGS, "sweep.name=killed"]
    sweep_dir = tmp_path / "sweeps" / "killed"
    cancel_leftovers(sweep_dir)
    p = bln_sweep(*args, "--detach", cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    (array,) = {j.split("_")[0] for j in job_ids(sweep_dir)}
    # a file check, fast enough to land well inside the 100-step trial
    wait_for(lambda: list(sweep_dir.glob("runs/*/search-*/ckpt.pt")), "a checkpoint", 300, 0.05)
    subprocess.run(["scancel", "--signal=KILL", "--full", array], check=True)
    wait_for(lambda: not in_queue(array), "the killed array to leave the queue", 120)
    killed = [t for t in all_trials(sweep_dir) if t.state.name == "RUNNING"]
    assert killed, "no trial was running when the workers were killed"

    p = bln_sweep(*args, cwd=tmp_path, timeout=900)  # the same command again
    assert p.returncode == 0, p.stdout + p.stderr
    facts = assert_sweep_intact(sweep_dir, n_trials=2, confirm_seeds=1)
    trials = all_trials(sweep_dir)
    states = [(t.number, t.state.name, t.user_attrs) for t in trials]
    for victim in killed:
        (dead,) = [t for t in trials if t._trial_id == victim._trial_id]
        assert dead.state.name == "FAIL" and dead.user_attrs.get("retried"), states
        (retry,) = [
            t
            for t in trials
            if t.user_attrs.get("retry_of") == victim.number
            and t.user_attrs["run_dir"] == victim.user_attrs["run_dir"]
        ]
        assert retry.state.name == "COMPLETE", states
        runs = [r for r in facts["runs"] if r.info.run_id == retry.user_attrs["mlflow_run_id"]]
        assert [r.info.status for r in runs] == ["FINISHED"]
        assert "resumed_from_step" in runs[0].data.tags  # continued, not a second run
    assert any(int(r.data.tags.get("resumed_from_step", 0)) >= 4 for r in facts["runs"]), (
        "no trial resumed from a checkpoint"
    )
    assert ranked(sweep_dir) == undisturbed
