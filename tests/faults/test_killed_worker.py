"""A worker killed between the start of its trial's MLflow run and the trial's first checkpoint.

tests/test_sweep.py kills a worker after its trial checkpointed (case 1): the retry resumes the
checkpoint and, with it, the same MLflow run. Before the first checkpoint there is no
checkpoint, but the run id is kept beside it from the moment the run exists: the retry trains
from step 0 in the same MLflow run, so no run is left RUNNING and none is duplicated. On a real
model that window is every trial's first `train.checkpoint_interval` steps (100 by default).
"""

import os
import signal

import pytest

from tests.faults.conftest import (
    FAST,
    all_trials,
    assert_sweep_intact,
    bln_sweep,
    pids_with,
    stop_leftovers,
    wait_for,
)


def running_mlflow_run(sweep_dir):
    """The pid of the worker whose trial has a RUNNING MLflow run and no checkpoint yet."""
    from mlflow.tracking import MlflowClient

    from bln_sweeps.search import load_manifest

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
