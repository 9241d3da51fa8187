"""One trial on 2 ranks (DDP over gloo, on CPU): `bln-train` started as two processes with the
torchrun environment trains as one process does on the same global batch, rank 0 alone writes
MLflow and checkpoints, and a preemption signal that reaches one rank stops both."""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bln_sweeps import checkpoint
from bln_sweeps.train import run

ROOT = Path(__file__).resolve().parents[1]
COMMON = ("train.steps=6", "train.eval_interval=3", "seq=s128", "seed=5")
GLOBAL_BN = ("norm=batchnorm", "norm.options.sync=global")  # leaky, but the same as one process

# A rank: compose the config as the fixtures do, run, and report what it saw. SIGNAL_AT makes
# rank 1 alone receive SIGUSR1 (what SLURM sends before preempting) at that evaluation step. A run
# started as ranks ends its process group itself, finished or preempted (a group left to
# interpreter exit can abort a finished rank).
RANK_SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys
    from bln_sweeps import checkpoint
    from bln_sweeps.compose import compose
    from bln_sweeps.config import to_run_config, validate
    from bln_sweeps.train import run

    cfg = validate(to_run_config(compose(sys.argv[1:])))
    signal_at = int(os.environ.get("SIGNAL_AT", "0"))

    def on_eval(step, metrics):
        if step == signal_at and os.environ["RANK"] == "1":
            os.kill(os.getpid(), signal.SIGUSR1)

    import torch.distributed as dist

    try:
        result = run(cfg, on_eval=on_eval)
        assert not dist.is_initialized(), "run left its process group alive"
        print("RESULT", json.dumps(result))
    except checkpoint.Preempted as e:
        assert not dist.is_initialized(), "a preempted run left its process group alive"
        print("PREEMPTED", e.step)
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(overrides: list[str], signal_at: int = 0) -> list[str]:
    """Start 2 ranks of `run` and return each one's last output line."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "SIGNAL_AT": str(signal_at),
            "OMP_NUM_THREADS": "1",
        }
        cmd = [sys.executable, "-c", RANK_SCRIPT, *overrides]
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    return [out.strip().splitlines()[-1] for out in outs]


def train_losses(tmp_path: Path, batch_size: int) -> list[float]:
    """The train-loss history in the checkpoint of the run with this batch.size (validation
    batches are batch.size rows, so val/loss is compared between the ranks only)."""
    for path in (tmp_path / "runs").glob(f"*/{checkpoint.CKPT_NAME}"):
        state = checkpoint.load(path)
        if state["config"]["batch"]["size"] == batch_size:
            return state["history"]["train_loss"]
    raise AssertionError(f"no checkpoint with batch.size={batch_size}")


def base(tmp_path: Path, uri: str, *extra: str) -> list[str]:
    return [
        *COMMON,
        "eval.tokens=512",
        "train.log_interval=1",
        "data.n_train_tokens=50000",
        "data.n_val_tokens=10000",
        f"train.out_dir={tmp_path}/runs",
        f"tracking.uri={uri}",
        *extra,
    ]


@pytest.mark.slow  # two rank processes and one reference process per case: ~1 min on 2 cores
@pytest.mark.parametrize(
    "norm",
    [["norm=layernorm"], ["norm=bln", "norm.options.sync=global"]],
    ids=["layernorm", "bln_global"],
)
def test_two_ranks_train_like_one_process_on_the_global_batch(norm, make_cfg, mlflow_uri, tmp_path):
    import json

    from mlflow.tracking import MlflowClient

    experiment = f"ddp-{norm[0].split('=')[1]}"
    ref = run(make_cfg(*COMMON, *norm, "batch=b4", f"tracking.experiment={experiment}-ref"))
    outs = run_ranks(
        base(tmp_path, mlflow_uri, *norm, "batch=b2", f"tracking.experiment={experiment}")
    )
    results = [json.loads(line.removeprefix("RESULT ")) for line in outs]
    # the train loss of every step (the mean over the global batch): the same up to the order
    # of the gradient reduction; and both ranks hold the same model at the end
    assert ref["status"] == results[0]["status"] == "finished"
    assert train_losses(tmp_path, 2) == pytest.approx(train_losses(tmp_path, 4), rel=1e-5)
    assert results[0]["val/loss"] == results[1]["val/loss"]
    # rank 0 alone talks to MLflow: one run, tagged with the ranks
    assert results[0]["run_id"] is not None and results[1]["run_id"] is None
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["n_ranks"] == "2"
    if len(norm) > 1:
        assert runs[0].data.params["norm.options.sync"] == "global"


@pytest.mark.slow  # three 2-rank launches: ~2 min on 2 cores
def test_a_signal_on_one_rank_stops_both_and_the_trial_resumes(make_cfg, mlflow_uri, tmp_path):
    import json

    overrides = base(
        tmp_path, mlflow_uri, *GLOBAL_BN, "batch=b2", "tracking.experiment=ddp-preempt"
    )
    assert run_ranks(overrides, signal_at=3) == ["PREEMPTED 3", "PREEMPTED 3"]
    ckpts = list((tmp_path / "runs").glob(f"*/{checkpoint.CKPT_NAME}"))
    assert len(ckpts) == 1 and checkpoint.load(ckpts[0])["step"] == 3  # written once, by rank 0
    resumed = [json.loads(line.removeprefix("RESULT ")) for line in run_ranks(overrides)]
    assert resumed[0]["status"] == "finished" and resumed[0]["step"] == 6
    run(make_cfg(*COMMON, *GLOBAL_BN, "batch=b4", "tracking.experiment=ddp-preempt-ref"))
    # the resumed 2-rank trial has the uninterrupted single-process trial's losses
    assert train_losses(tmp_path, 2) == pytest.approx(train_losses(tmp_path, 4), rel=1e-5)


@pytest.mark.slow  # a local sweep whose one worker job is 2 ranks: ~2 min on 2 cores
def test_sweep_worker_of_two_ranks_runs_each_trial_once_on_both(tmp_path):
    from tests.test_sweep import FAST, bln_sweep, sweep_facts

    p = bln_sweep(
        "norm=bln",
        "norm.options.sync=global",
        "sweep.grid={batch: b4}",  # one cell
        "sweep.name=ddp",
        "search.n_trials=3",
        "search.confirm_seeds=0",
        "search.sampler=random",
        "search.pruner=median",
        "search.params={optim.lr:'choice(3e-3, 1e-7)'}",
        "launcher.workers=1",
        "launcher.ranks_per_worker=2",
        *FAST,
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    facts = sweep_facts(tmp_path / "sweeps" / "ddp")
    trials = facts["cells"]["batch=b4"]["search"]
    assert len(trials) == 3 and all(t.state.is_finished() for t in trials)
    runs = [r for r in facts["runs"] if r.data.tags["kind"] == "trial"]
    # rank 0 alone logged: one MLflow run per trial, each trained by 2 ranks with global stats
    assert len(runs) == 3 and {r.data.tags["n_ranks"] for r in runs} == {"2"}
    assert {r.data.params["norm.options.sync"] for r in runs} == {"global"}
    logs = list((tmp_path / "sweeps" / "ddp" / "jobs").rglob("*_1_log.err"))
    assert logs, "no log of rank 1"  # one log per rank, as submitit writes them


def test_ranks_per_worker_must_match_the_gpus():
    from bln_sweeps.config import ConfigError
    from launchers.submit import ranks_per_worker

    base = {"name": "local", "gpus_per_worker": 0, "ranks_per_worker": 0}
    assert ranks_per_worker(base) == 1
    assert ranks_per_worker({**base, "gpus_per_worker": 4}) == 4
    assert ranks_per_worker({**base, "ranks_per_worker": 2}) == 2  # gloo ranks on CPU
    with pytest.raises(ConfigError, match="launcher.ranks_per_worker=3.*gpus_per_worker=2"):
        ranks_per_worker({**base, "gpus_per_worker": 2, "ranks_per_worker": 3})
    with pytest.raises(ConfigError, match="launcher=debug runs one rank"):
        ranks_per_worker({**base, "name": "debug", "ranks_per_worker": 2})
