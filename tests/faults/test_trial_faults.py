"""Case 4: a trial that diverges, one that raises, one that runs out of memory.

Each fault gets a cell of its own, through per-norm search params that are one-value choices:
rmsnorm trains at lr 1000 (diverges), identity raises at step 3 and batchnorm raises
torch.OutOfMemoryError at step 3 (the test-only `train.fault` hook). layernorm is the undisturbed
cell. One local worker runs everything, so the same process must survive every fault.
"""

import pytest
import torch

from bln_sweeps.checkpoint import CKPT_NAME, load
from bln_sweeps.train import run
from tests.faults.conftest import SWEEP, all_trials, assert_sweep_intact, bln_sweep, ranked

FAULTS = [
    "+search.per_norm.rmsnorm={optim.lr:'choice(1000.0)'}",
    "+search.per_norm.identity={train.fault:'choice(raise@3)'}",
    "+search.per_norm.batchnorm={train.fault:'choice(oom@3)'}",
]
# cell -> (Optuna user attr `status`, MLflow tag `status`, the start of the reason)
EXPECTED = {
    "norm=rmsnorm": ("diverged", "diverged", "train loss "),
    "norm=identity": ("failed", "failed", "RuntimeError: injected by train.fault=raise@3"),
    "norm=batchnorm": ("failed", "failed", "OutOfMemoryError: injected by train.fault=oom@3"),
}
# the columns of a table row that depend on its own cell only
OWN = ("mean", "std", "ci_low", "ci_high", "n_seeds", "val/loss@batch", "best_value", "best_params")


@pytest.mark.slow
def test_failing_trials_are_recorded_with_their_reason_and_the_sweep_goes_on(tmp_path, reference):
    args = [
        "norm=layernorm,rmsnorm,identity,batchnorm",
        *SWEEP[1:],
        *FAULTS,
        "sweep.name=faults",
        "launcher.workers=1",
    ]
    p = bln_sweep(*args, cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    sweep_dir = tmp_path / "sweeps" / "faults"
    confirmed = {"norm=layernorm": 2, **{cell: 0 for cell in EXPECTED}}
    facts = assert_sweep_intact(sweep_dir, confirm_seeds=confirmed)

    runs = {r.info.run_id: r for r in facts["runs"]}
    for cell, (status, tag, reason) in EXPECTED.items():
        for t in facts["cells"][cell]["search"]:
            assert t.state.name == "FAIL"
            assert t.user_attrs["status"] == status
            assert t.user_attrs["status_reason"].startswith(reason), t.user_attrs
        mlflow_runs = [
            r
            for r in runs.values()
            if r.data.tags.get("cell") == cell and r.data.tags["kind"] != "cell"
        ]
        assert len(mlflow_runs) == 2  # one per trial; no confirm run for a cell with no success
        for r in mlflow_runs:
            assert r.info.status == "FAILED"
            assert r.data.tags["status"] == tag
            assert r.data.tags["status_reason"].startswith(reason), r.data.tags
    layernorm = facts["cells"]["norm=layernorm"]
    assert all(t.state.name == "COMPLETE" for t in layernorm["search"] + layernorm["confirm"])
    assert len({t.user_attrs["pid"] for t in all_trials(sweep_dir)}) == 1  # one worker survived

    table = ranked(sweep_dir)
    assert {k: table["norm=layernorm"][k] for k in OWN} == {
        k: reference["norm=layernorm"][k] for k in OWN
    }
    assert table["norm=rmsnorm"]["n_diverged"] == 2
    assert table["norm=identity"]["n_failed"] == table["norm=batchnorm"]["n_failed"] == 2


@pytest.mark.parametrize(
    "fault, error", [("raise@2", RuntimeError), ("oom@2", torch.OutOfMemoryError)]
)
def test_the_fault_hook_fails_the_step_it_names(fault, error, make_cfg, tmp_path):
    cfg = make_cfg(f"train.fault={fault}", "train.checkpoint_interval=1", tracking=False)
    with pytest.raises(error, match=f"injected by train.fault={fault}"):
        run(cfg, run_dir=tmp_path / "run")
    assert load(tmp_path / "run" / CKPT_NAME)["step"] == 1  # the step before it completed
