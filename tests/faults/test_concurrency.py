"""Case 5: eight workers on the embedded default storage (an Optuna journal file and an MLflow
SQLite file in the sweep directory) at once: no lock error anywhere, every run and every metric
point present, and every trial of a cell (the same config, seed 0) at the same val/loss bitwise,
whichever worker ran it. The training is tiny and short so that the stores, not the CPU, are the
busy part: each run logs every step."""

import re

import pytest

from bln_sweeps.sweep.manifest import load_manifest
from bln_sweeps.tracking.contract import LOST_METRICS_TAG, metric_key
from tests.faults.conftest import assert_sweep_intact, bln_sweep

STEPS, EVAL_EVERY = 4, 2
TINY = [
    f"train.steps={STEPS}",
    f"train.eval_interval={EVAL_EVERY}",
    "eval.tokens=512",
    "train.log_interval=1",
    "train.checkpoint_interval=2",
    "batch.tokens_per_step=512",
    "seq.len=64",
    "data.n_train_tokens=20000",
    "data.n_val_tokens=4000",
]
WORKERS, N_TRIALS = 8, 6


def overlap(trials) -> int:
    """The most trials that ran at the same moment (from their start and end stamps)."""
    events = sorted(
        [(t.datetime_start, 1) for t in trials] + [(t.datetime_complete, -1) for t in trials]
    )
    now = most = 0
    for _, d in events:
        now += d
        most = max(most, now)
    return most


@pytest.mark.slow
def test_eight_workers_on_embedded_storage_lose_nothing(tmp_path):
    from mlflow.tracking import MlflowClient

    p = bln_sweep(
        "norm=layernorm,rmsnorm",
        f"search.n_trials={N_TRIALS}",
        "search.confirm_seeds=1",
        "search.pruner=none",
        "search.params={optim.lr:'choice(1e-3)'}",
        f"launcher.workers={WORKERS}",
        "sweep.name=busy",
        *TINY,
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    sweep_dir = tmp_path / "sweeps" / "busy"
    facts = assert_sweep_intact(sweep_dir, n_trials=N_TRIALS, confirm_seeds=1)

    logs = sorted((sweep_dir / "jobs").rglob("*_log.*"))
    assert len({path.parent for path in logs}) == WORKERS  # every worker job ran
    worker_logs = "\n".join(path.read_text(errors="replace") for path in logs)
    for text, bad in ((worker_logs, "locked|OperationalError|Traceback"), (p.stdout, "locked")):
        assert not re.findall(f".*(?:{bad}).*", text, re.IGNORECASE)

    trials = [t for c in facts["cells"].values() for t in c["search"] + c["confirm"]]
    assert overlap(trials) >= 2  # the stores really were shared by concurrent trials
    for cell in facts["cells"].values():
        # the search trials are replicas of one run (one lr, the search seed), whichever worker
        # ran them; the confirm run trains with a fresh seed, so it is a different run
        assert len({t.value for t in cell["search"]}) == 1
        assert {t.value for t in cell["confirm"]}.isdisjoint({t.value for t in cell["search"]})
    client = MlflowClient(tracking_uri=load_manifest(sweep_dir)["tracking_uri"])
    training = [r for r in facts["runs"] if r.data.tags["kind"] in ("trial", "confirm")]
    assert len(training) == 2 * (N_TRIALS + 1)
    evals = list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
    for r in training:
        assert r.info.status == "FINISHED" and LOST_METRICS_TAG not in r.data.tags
        for name, steps in (
            ("train/loss", list(range(1, STEPS + 1))),
            ("train/lr", list(range(1, STEPS + 1))),
            ("val/loss", evals),
            ("val/loss@batch", evals),
            ("perf/wall_s", [STEPS]),
        ):
            history = client.get_metric_history(r.info.run_id, metric_key(name))
            assert sorted(m.step for m in history) == steps, (r.info.run_name, name)
        assert {a.path for a in client.list_artifacts(r.info.run_id)} >= {
            "config.yaml",
            "loss_curve.png",
        }
