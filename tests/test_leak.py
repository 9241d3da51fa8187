"""The leak probe: it finds every leak of the causality matrix, changes nothing a run could notice,
is logged by every run (and drives the `leaky` tag), and catches a mis-declared norm."""

import math

import pytest
import torch

from bln_sweeps import leak
from bln_sweeps.cli import train_main
from bln_sweeps.norms import BatchNorm
from bln_sweeps.train import run
from tests.test_model import EXPECTED_TRAIN, VARIANTS, idx_batch, make_model, warm_up
from tests.test_train import mlflow_client


class LyingBatchNorm(BatchNorm):
    """BatchNorm that declares itself causal: what a wrong declaration in a new norm looks like."""

    def __init__(self, dim, **options):
        super().__init__(dim, **options)
        self.causal_in_train = True


@pytest.mark.parametrize("label, key, options", VARIANTS, ids=[v[0] for v in VARIANTS])
@pytest.mark.parametrize("placement", ["pre", "peri"])
def test_probe_measures_what_the_causality_matrix_says(label, key, options, placement):
    model = make_model(key, options, qk_norm="rmsnorm", norm_placement=placement)
    warm_up(model, steps=2)
    report = leak.probe(model, idx_batch(), step=0)
    leaks = any(EXPECTED_TRAIN[label][:2])  # positions < k move, own or other sequences
    assert report.leaked == leaks, report.line()
    assert (report.max_delta > 1e-4) == leaks and report.noise == 0.0
    assert not report.mismatch and report.declared_causal == (not leaks)


def test_a_mis_declared_norm_is_a_mismatch():
    model = make_model("batchnorm", {})
    for _, norm in model.norm_modules():
        norm.causal_in_train = True  # the lie
    report = leak.probe(model, idx_batch(), step=0)
    assert report.leaked and report.declared_causal and report.mismatch
    assert "MISMATCH" in report.line() and "\n" not in report.line()


@pytest.mark.parametrize(
    "key, options",
    [
        ("bln", {"batch_size": 4, "max_len": 12}),
        ("batchnorm", {}),
        ("powernorm", {"groups": 4, "warmup_steps": 1000}),
        ("causal_batchnorm", {}),
    ],
)
def test_probe_changes_no_weight_buffer_rng_or_sampler(key, options):
    from bln_sweeps.data import BatchSampler

    model = make_model(key, options, qk_norm="layernorm")
    warm_up(model, steps=2)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = torch.randint(0, 64, (5000,), generator=torch.Generator().manual_seed(0))
    sampler = BatchSampler(tokens.numpy().astype("uint16"), 4, 12, seed=3)
    sampler.next_batch()
    sampler_state, rng = sampler.state_dict(), torch.get_rng_state()
    x = leak.peek_batch(sampler)
    leak.probe(model, x, step=0)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(torch.get_rng_state(), rng) and model.training
    assert all(m.training for m in model.modules())  # every flag as it was
    assert sampler.state_dict() == sampler_state
    assert torch.equal(sampler.next_batch()[0], x)  # the batch training gets next is the one probed


def test_training_is_bitwise_identical_without_the_probe(make_cfg, tmp_path, monkeypatch):
    """PowerNorm with a warm-up: two probes (step 0 and the end of the warm-up), and BLN-style
    running buffers move in every train-mode forward; the probed run must not notice."""
    import bln_sweeps.checkpoint as checkpoint

    overrides = ("norm=powernorm", "train.steps=8", "optim.warmup_frac=0.25", "seed=2")
    probed = run(make_cfg(*overrides, f"train.out_dir={tmp_path}/a", tracking=False))
    monkeypatch.setattr(leak, "probe_when_due", lambda *a, **k: None)
    plain = run(make_cfg(*overrides, f"train.out_dir={tmp_path}/b", tracking=False))
    assert probed["val/loss"] == plain["val/loss"]
    assert probed["val/loss@batch"] == plain["val/loss@batch"]
    (a,) = (tmp_path / "a").rglob(checkpoint.CKPT_NAME)
    (b,) = (tmp_path / "b").rglob(checkpoint.CKPT_NAME)
    sa, sb = checkpoint.load(a), checkpoint.load(b)
    assert [r["step"] for r in sa["history"]["leak"]] == [0, 2]
    assert sa["history"]["train_loss"] == sb["history"]["train_loss"]
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])


def test_every_run_logs_its_probes_and_the_measured_leaky_tag(make_cfg, mlflow_uri):
    cfg = make_cfg("norm=powernorm", "train.steps=8", "optim.warmup_frac=0.25")
    result = run(cfg)
    client = mlflow_client(mlflow_uri)
    tags = client.get_run(result["run_id"]).data.tags
    assert tags["leaky"] == tags["leak.measured"] == "true"
    assert tags["leak.step"] == "0" and tags["leak.probes"] == "0,2"
    assert tags["leak.mismatch"] == "false" and float(tags["leak.max_delta"]) > 1e-4
    history = client.get_metric_history(result["run_id"], "leak/max_delta")
    steps = {m.step: m.value for m in history}
    assert sorted(steps) == [0, 2] and steps[0] > 1e-4 and steps[2] == 0.0  # past the warm-up

    causal = run(make_cfg("norm=dyt", "model.qk_norm=rmsnorm", "model.norm_placement=peri"))
    tags, params = (getattr(client.get_run(causal["run_id"]).data, a) for a in ("tags", "params"))
    assert (params["model.qk_norm"], params["model.norm_placement"]) == ("rmsnorm", "peri")
    assert params["norm.options.alpha_init"] == "0.5"
    assert params["norm.sites.ln_1.alpha_init"] == "None"  # = norm.options.alpha_init
    metrics = client.get_run(causal["run_id"]).data.metrics
    assert 0 <= metrics["dyt/saturated:ln_1"] <= 1 and "dyt/saturated:ln_2_out" in metrics
    assert tags["leaky"] == tags["leak.measured"] == "false"
    assert tags["leak.probes"] == "0" and float(tags["leak.max_delta"]) == 0.0


def test_a_mis_declared_norm_is_tagged_and_said_in_one_line(
    make_cfg, mlflow_uri, monkeypatch, capsys
):
    import bln_sweeps.build as build

    real = build.build_norm
    monkeypatch.setattr(
        build,
        "build_norm",
        lambda name, dim, **o: (
            LyingBatchNorm(dim, **o) if name == "batchnorm" else real(name, dim, **o)
        ),
    )
    result = run(make_cfg("norm=batchnorm", "train.steps=2"))
    tags = mlflow_client(mlflow_uri).get_run(result["run_id"]).data.tags
    assert tags["leak.mismatch"] == "true"
    assert tags["leaky"] == "true"  # measured, although every module declares itself causal
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "MISMATCH" in ln]
    assert len(lines) == 1 and "leak probe at step 0: LEAKS" in lines[0]


def test_probe_leak_cli_reports_without_training(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    small = ["data.n_train_tokens=20000", "data.n_val_tokens=5000", "seq=s128", "batch=b4"]
    code = train_main(["--probe-leak", "norm=layernorm,batchnorm,powernorm", *small])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert [ln.split("] ")[1].split(" (")[0] for ln in out if ln.startswith("[")] == [
        "leak probe at step 0: LEAKS" if n != "layernorm" else "leak probe at step 0: causal"
        for n in ("layernorm", "batchnorm", "powernorm")
    ]
    assert any("warm-up" in ln for ln in out)  # PowerNorm: the run probes again after it
    assert not list(tmp_path.iterdir())  # no run, no checkpoint, no MLflow store


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.qk_norm=l2", "model.qk_norm='l2': valid choices: none, rmsnorm, layernorm"),
        ("model.norm_placement=post", "model.norm_placement='post': valid choices: pre, peri"),
        ("norm.options.alpha_init=-1", "norm.options='dyt': alpha_init=-1: must be a number > 0"),
        ("norm.sites.ln_2.alpha_init=0", "norm.sites.ln_2={'alpha_init': 0}: alpha_init=0: must"),
    ],
)
def test_bad_switches_are_one_line_and_exit_2(override, key, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for argv in (["norm=dyt", override], ["--probe-leak", "norm=dyt", override]):
        assert train_main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and key in err, err
    assert not list(tmp_path.iterdir())


def test_probe_is_cheap_on_the_tiny_model():
    """Three forward passes of the tiny model (B=8, T=128): reported, never asserted as time."""
    from bln_sweeps.build import flavour
    from bln_sweeps.model import GPT
    from bln_sweeps.norms import build_norm

    cfg = flavour("tiny", block_size=128)
    model = GPT(cfg, lambda site: build_norm("bln", cfg.n_embd, batch_size=8, max_len=128))
    x = torch.randint(0, cfg.vocab_size, (8, 128), generator=torch.Generator().manual_seed(0))
    report = leak.probe(model, x, step=0)
    assert math.isfinite(report.seconds) and not report.leaked


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("norm, leaky", [("layernorm", False), ("dyt", False), ("batchnorm", True)])
def test_compiled_qk_norm_peri_run_probes_under_bf16_on_gpu(make_cfg, mlflow_uri, norm, leaky):
    """The CUDA path: torch.compile with QK-norm and Peri-LN, bf16 autocast, and the probe's
    verdict there (GPU kernels must not turn float noise into a leak, nor hide a real one)."""
    cfg = make_cfg(
        f"norm={norm}",
        "model.qk_norm=rmsnorm",
        "model.norm_placement=peri",
        "train.compile=true",
        "train.device=cuda",
        "train.steps=4",
    )
    result = run(cfg)
    assert result["status"] == "finished" and math.isfinite(result["val/loss"])
    tags = mlflow_client(mlflow_uri).get_run(result["run_id"]).data.tags
    assert tags["leaky"] == tags["leak.measured"] == str(leaky).lower()
    assert tags["leak.mismatch"] == "false"
