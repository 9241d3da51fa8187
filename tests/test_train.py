"""bln-train end to end on the tiny model: MLflow contents, exact resume, divergence, bad input."""

import math
import os
import re
import signal
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from bln_sweeps import checkpoint
from bln_sweeps.build import build_model
from bln_sweeps.config import group_options
from bln_sweeps.evaluate import ALL_BLN_SWITCHES, evaluate
from bln_sweeps.train import run

ROOT = Path(__file__).resolve().parents[1]


def mlflow_client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_run_lands_in_mlflow(make_cfg, mlflow_uri):
    cfg = make_cfg("norm=bln", "batch=b4", "seq=s128", "optim.lr=3e-4")
    result = run(cfg)
    assert result["status"] == "finished" and math.isfinite(result["val/loss"])
    r = mlflow_client(mlflow_uri).get_run(result["run_id"])
    p, t, m = r.data.params, r.data.tags, r.data.metrics
    assert (p["norm.name"], p["batch.size"], p["seq.len"], p["optim.lr"]) == (
        "bln",
        "4",
        "128",
        "0.0003",
    )
    assert p["norm.options.batch_size"] == "4"
    assert t["leaky"] == "false" and t["status"] == "finished" and t["kind"] == "single"
    assert re.fullmatch(r"[0-9a-f]{40}", t["git.sha"]), t["git.sha"]  # not "unknown"
    assert t["device"] == "cpu"
    assert m["val/loss"] == pytest.approx(result["val/loss"])
    assert "val/loss:batch" in m and "train/loss" in m and "perf/tokens_per_s" in m
    assert r.info.status == "FINISHED" and r.info.run_name == "bln · b4 · s128"
    arts = {a.path for a in mlflow_client(mlflow_uri).list_artifacts(r.info.run_id)}
    assert {"config.yaml", "loss_curve.png"} <= arts


def test_leaky_norm_is_tagged(make_cfg, mlflow_uri):
    result = run(make_cfg("norm=batchnorm", "train.steps=2"))
    assert mlflow_client(mlflow_uri).get_run(result["run_id"]).data.tags["leaky"] == "true"


def test_resume_after_signal_is_exact(make_cfg, mlflow_uri, tmp_path):
    overrides = ("norm=powernorm", "train.steps=8", "train.eval_interval=4", "seed=3")
    reference = run(make_cfg(*overrides, f"train.out_dir={tmp_path}/a"))

    cfg = make_cfg(*overrides, f"train.out_dir={tmp_path}/b")

    def preempt_at_4(step, metrics):
        if step == 4:
            os.kill(os.getpid(), signal.SIGUSR1)  # what SLURM sends before a time limit

    with pytest.raises(checkpoint.Preempted) as stopped:
        run(cfg, on_eval=preempt_at_4)
    assert stopped.value.step == 4
    client = mlflow_client(mlflow_uri)
    first_id = checkpoint.load(stopped.value.path)["run_id"]
    assert client.get_run(first_id).info.status == "KILLED"

    resumed = run(cfg)
    assert resumed["val/loss"] == reference["val/loss"]  # bitwise on CPU
    assert resumed["val/loss@batch"] == reference["val/loss@batch"]
    assert resumed["run_id"] == first_id  # the same MLflow run continues
    run_ = client.get_run(first_id)
    assert run_.info.status == "FINISHED" and run_.data.tags["resumed_from_step"] == "4"
    steps = [m.step for m in client.get_metric_history(first_id, "val/loss")]
    assert steps == [4, 8]


# A first attempt SIGKILLed as its MLflow run is made: right after the run exists (before its id
# is noted beside the checkpoint), or while the run's params are written (after it is noted).
KILLED_ATTEMPT = """
import os, signal, sys
from bln_sweeps.compose import compose
from bln_sweeps.config import to_run_config, validate
from bln_sweeps.tracking import logger
from bln_sweeps.train import run

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if sys.argv[1] == "created":
    start = logger.RunLogger.start.__func__
    dying = lambda cls, *a, **k: start(cls, *a, **{**k, "on_created": die})
    logger.RunLogger.start = classmethod(dying)
else:
    logger.log_now = die
run(validate(to_run_config(compose(sys.argv[2:]))))
"""


@pytest.mark.parametrize("killed", ["created", "params"])
def test_attempt_killed_as_its_run_is_made_is_continued_in_that_run(
    killed, make_cfg, mlflow_uri, tmp_path
):
    overrides = [
        "train.steps=4",
        "train.eval_interval=2",
        "eval.tokens=1024",
        "data.n_train_tokens=50000",
        "data.n_val_tokens=10000",
        f"train.out_dir={tmp_path}/runs",
        f"tracking.uri={mlflow_uri}",
        f"tracking.experiment=window-{killed}",
    ]
    p = subprocess.run([sys.executable, "-c", KILLED_ATTEMPT, killed, *overrides], cwd=ROOT)
    assert p.returncode == -signal.SIGKILL
    client = mlflow_client(mlflow_uri)
    exp = client.get_experiment_by_name(f"window-{killed}")
    (orphan,) = client.search_runs([exp.experiment_id])
    assert orphan.info.status == "RUNNING"

    result = run(make_cfg(*overrides))  # the retry: same config, same run directory
    (only,) = client.search_runs([exp.experiment_id])
    assert result["run_id"] == orphan.info.run_id == only.info.run_id
    assert only.info.status == "FINISHED" and only.data.params["optim.lr"]
    assert only.data.tags["resumed_from_step"] == "0"


def test_finished_run_is_not_trained_twice(make_cfg):
    cfg = make_cfg("train.steps=2")
    first = run(cfg)
    assert run(cfg) == first


def test_divergence_stops_with_a_reason(make_cfg, mlflow_uri):
    result = run(make_cfg("optim.lr=50", "optim.warmup_frac=0", "train.steps=30"))
    assert result["status"] == "diverged" and "train loss" in result["status_reason"]
    r = mlflow_client(mlflow_uri).get_run(result["run_id"])
    assert r.info.status == "FAILED" and r.data.tags["status"] == "diverged"


def test_evaluation_leaves_buffers_unchanged(make_cfg):
    cfg = make_cfg("norm=powernorm", "norm.options.warmup_steps=2")
    model = build_model(cfg)
    x = torch.randint(0, 64, (4, 32))
    model.train()
    with torch.no_grad():
        model(x, x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    evaluate(model, (x, x), 2, nullcontext, batch_stats=True, bln_codes=["all"])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bln_switch_combinations_are_reported(make_cfg):
    result = run(make_cfg("norm=bln", "eval.bln_switches=[all]", "train.steps=2", tracking=False))
    assert {f"val/loss@bln-{c}" for c in ALL_BLN_SWITCHES} <= set(result)
    assert result["val/loss@bln-TTFF"] == result["val/loss"]  # TTFF is BLN's default eval


def test_powernorm_warmup_counts_optimizer_steps(make_cfg):
    cfg = make_cfg(
        "norm=powernorm",
        "batch=b2",
        "seq=s128",
        "batch.tokens_per_step=1024",
        "optim.warmup_frac=0.5",
        "train.steps=8",
    )
    assert cfg.grad_accum == 4 and cfg.warmup_steps == 4
    norm = build_model(cfg).transformer.h[0].ln_1
    assert norm.warmup_steps == 4 and norm.accum_steps == 4  # 16 forward calls


def bln_train(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "bln_sweeps.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize(
    "args, key",
    [
        (["norm=foo"], "norm"),
        (["optim.lrr=1"], "optim.lrr"),
        (["norm=bln", "norm.options.zetaa=1"], "norm.options.zetaa"),
        (["optim.lr=abc"], "optim.lr"),
        (["seq=s4096", "model.block_size=1024"], "seq.len"),
        (["optim.lr=-1"], "optim.lr"),
        (["train.steps=0"], "train.steps"),
        (["batch=b8", "batch.tokens_per_step=1000"], "batch.tokens_per_step"),
        (["norm=bln", "norm.options.stats=median"], "norm.options"),
        (["norm=powernorm", "norm.options.groups=5"], "norm.options"),
        (["data=tokens", "data.path=/nonexistent"], "data.path"),
        (["-m", "norm=layernorm,nope"], "norm"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_run(args, key, tmp_path):
    p = bln_train(*args, cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], p.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


def test_cli_multirun_grid(tmp_path):
    p = bln_train(
        "-m",
        "norm=layernorm,rmsnorm",
        "batch=b2,b4",
        "train.steps=2",
        "train.eval_interval=2",
        "eval.tokens=512",
        "data.n_train_tokens=20000",
        "data.n_val_tokens=5000",
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("finished") == 4
    client = mlflow_client(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("bln-train").experiment_id])
    assert sorted((r.data.params["norm.name"], r.data.params["batch.size"]) for r in runs) == [
        ("layernorm", "2"),
        ("layernorm", "4"),
        ("rmsnorm", "2"),
        ("rmsnorm", "4"),
    ]


def train_one_step(make_cfg, norm: str, batch: str, seq: str, train_tokens: int) -> None:
    """One optimizer step and an eval of one composition; it must finish with a finite loss."""
    cfg = make_cfg(
        f"norm={norm}",
        f"batch={batch}",
        f"seq={seq}",
        "train.steps=1",
        "train.eval_interval=1",
        "eval.tokens=512",
        f"data.n_train_tokens={train_tokens}",
        tracking=False,
    )
    result = run(cfg)
    assert result["status"] == "finished" and math.isfinite(result["val/loss"]), cfg


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_full_norm_batch_seq_product_trains_on_gpu(make_cfg):
    """All 8 x 7 x 6 combinations. On CPU the long-and-wide corner alone (b64 x s4096, 262k
    tokens per micro-batch) takes over a minute per norm, so CI runs the two slices below."""
    for norm in group_options("norm"):
        for batch in group_options("batch"):
            for seq in group_options("seq"):
                train_one_step(make_cfg, norm, batch, seq, train_tokens=300_000)


@pytest.mark.slow
def test_every_norm_batch_seq_combination_trains(make_cfg):
    """Every norm with every batch size (at the shortest sequence) and with every sequence
    length (at b2) on the tiny model: one optimizer step and an eval each. The full product
    adds nothing but minutes: no code path depends on batch size and length together."""
    norms, batches, seqs = group_options("norm"), group_options("batch"), group_options("seq")
    shortest = min(seqs, key=lambda s: int(s[1:]))
    combos = {(n, b, shortest) for n in norms for b in batches}
    combos |= {(n, "b2", s) for n in norms for s in seqs}
    for norm, batch, seq in sorted(combos):
        train_one_step(make_cfg, norm, batch, seq, train_tokens=20_000)
