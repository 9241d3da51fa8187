"""analysis: MLflow runs -> ranked comparison tables, exports, plots, and the bln-analyze CLI.

Runs with known values are logged with MlflowClient into a temporary SQLite store (one per
module: the first open of a store runs MLflow's migrations, which takes seconds). Every number
the table reports is recomputed here from those values with numpy/scipy.
"""

import json
import math
import subprocess
import sys
import xml.etree.ElementTree as ET
from io import StringIO
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis import comparison_table, load_runs
from analysis.contract import AnalysisError
from analysis.load import load_history
from analysis.stats import holm
from analysis.tables import pivot

ROOT = Path(__file__).resolve().parents[1]
SWEEP = "unit-sweep"
SINGLE = "unit-single"

NORMS = ["layernorm", "bln", "batchnorm"]
BATCHES = [4, 16]
SEQS = [128, 256]
SEEDS = [0, 1, 2]
BASE = {"layernorm": 3.00, "bln": 2.95, "batchnorm": 3.10}
NOISE = {0: 0.010, 1: -0.020, 2: 0.015, 3: 0.030}  # per seed, shared by all cells (pairing)
SPREAD = {"layernorm": 1.0, "bln": 1.5, "batchnorm": 2.0}
TRIAL_LRS = [1e-3, 3e-4, 6e-4]
BEST_LR = 3e-4
ARTIFACTS = "/tmp/bln-analysis-tests-artifacts"  # recorded only; nothing is written there
WELCH_CELL = ("batchnorm", 16, 256)  # its confirm seeds are 0, 1, 3: no pairing with layernorm


def confirm_seeds(norm, batch, seq):
    return [0, 1, 3] if (norm, batch, seq) == WELCH_CELL else SEEDS


def confirm_loss(norm, batch, seq, seed):
    """val/loss of a confirm run: a norm effect, a regime effect, seed noise."""
    wobble = 0.004 * ((7 * seed + batch + seq // 64 + len(norm)) % 5)  # differs by cell
    return (
        BASE[norm]
        + 0.02 * math.log2(batch)
        - 0.03 * math.log2(seq / 128)
        + (SPREAD[norm] * NOISE[seed] + wobble)
    )


def trial_loss(norm, batch, seq, lr):
    return confirm_loss(norm, batch, seq, 0) + 100 * abs(lr - BEST_LR)


def batch_loss(norm, loss):
    """val/loss@batch: batch-statistic norms look better in train mode (the leak)."""
    return loss - (0.05 if norm == "batchnorm" else 0.01)


def _log(client, exp_id, name, *, params=None, tags=None, metrics=None, history=None, end=None):
    from mlflow.entities import Metric, Param, RunTag

    run = client.create_run(exp_id, run_name=name, start_time=1_700_000_000_000)
    ms = [
        Metric(k, v, 1_700_000_000_000 + s, s) for k, pts in (history or {}).items() for s, v in pts
    ]
    ms += [Metric(k, v, 1_700_000_100_000, 1000) for k, v in (metrics or {}).items()]
    client.log_batch(
        run.info.run_id,
        metrics=ms,
        params=[Param(k, str(v)) for k, v in (params or {}).items()],
        tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
    )
    if end != "RUNNING":
        client.set_terminated(run.info.run_id, end or "FINISHED", 1_700_000_200_000)
    return run.info.run_id


def _params(norm, batch, seq, lr, seed):
    p = {
        "norm.name": norm,
        "batch.size": batch,
        "batch.tokens_per_step": 4096,
        "seq.len": seq,
        "optim.lr": lr,
        "optim.weight_decay": 0.1,
        "seed": seed,
        "model.name": "tiny",
        "model.n_layer": 2,
        "train.compile": False,
        "data.path": None,
        "eval.bln_switches": '["TTFF"]',
    }
    if norm == "bln":
        p["norm.options.stats"] = "ema"
    return p


def _metrics(norm, loss, wall=3600.0):
    m = {"val/loss": loss, "val/loss:batch": batch_loss(norm, loss), "perf/wall_s": wall}
    m["perf/tokens_per_s"] = 1000.0 + 10 * loss
    if norm == "bln":
        m["val/loss:bln-TTFF"] = loss + 0.002
    return m


def _log_sweep(client):
    exp = client.create_experiment(SWEEP, artifact_location=ARTIFACTS)
    sweep = _log(client, exp, "sweep", tags={"kind": "sweep", "sweep": SWEEP})
    ids = {}
    for norm in NORMS:
        for batch in BATCHES:
            for seq in SEQS:
                cell = f"norm={norm},batch=b{batch},seq=s{seq}"
                base = {"sweep": SWEEP, "cell": cell, "leaky": str(norm == "batchnorm").lower()}
                base["device"] = "cuda:NVIDIA H100" if batch == 16 else "cpu"
                base["n_devices"] = 2 if batch == 16 else 1
                parent_tags = {"kind": "cell", "sweep": SWEEP, "cell": cell}
                parent = _log(client, exp, cell, tags={**parent_tags, "mlflow.parentRunId": sweep})
                run_tags = {**base, "mlflow.parentRunId": parent}
                for t, lr in enumerate(TRIAL_LRS):
                    status = "finished"
                    if (norm, batch, seq) == ("bln", 4, 128) and t == 2:
                        status = "pruned"
                    loss = trial_loss(norm, batch, seq, lr)
                    ids[(norm, batch, seq, "trial", t)] = _log(
                        client,
                        exp,
                        f"{cell} trial {t}",
                        params=_params(norm, batch, seq, lr, 0),
                        tags={**run_tags, "kind": "trial", "trial": t, "status": status},
                        metrics=_metrics(norm, loss),
                    )
                if (norm, batch, seq) == ("bln", 4, 128):  # a failed and a diverged trial
                    _log(
                        client,
                        exp,
                        "trial 3",
                        params=_params(norm, batch, seq, 1e-2, 0),
                        tags={
                            **run_tags,
                            "kind": "trial",
                            "trial": 3,
                            "status": "failed",
                            "status_reason": "RuntimeError: boom",
                        },
                        end="FAILED",
                    )
                    _log(
                        client,
                        exp,
                        "trial 4",
                        params=_params(norm, batch, seq, 5e-2, 0),
                        tags={**run_tags, "kind": "trial", "trial": 4, "status": "diverged"},
                        metrics={"val/loss": float("nan"), "perf/wall_s": 60.0},
                    )
                for seed in confirm_seeds(norm, batch, seq):
                    loss = confirm_loss(norm, batch, seq, seed)
                    history = {"val/loss": [(s, loss + 1.0 / s) for s in (10, 20, 40)]}
                    history["val/loss"].append((1000, loss))
                    ids[(norm, batch, seq, "confirm", seed)] = _log(
                        client,
                        exp,
                        f"{cell} confirm seed {seed}",
                        params=_params(norm, batch, seq, BEST_LR, seed),
                        tags={
                            **run_tags,
                            "kind": "confirm",
                            "trial": 100 + seed,
                            "status": "finished",
                        },
                        metrics=_metrics(norm, loss),
                        history=history,
                    )
    deleted = _log(
        client,
        exp,
        "deleted",
        params=_params("bln", 4, 128, 1e-3, 9),
        tags={"kind": "confirm", "cell": "norm=bln,batch=b4,seq=s128", "status": "finished"},
        metrics={"val/loss": 0.0},
    )
    client.delete_run(deleted)
    return ids


SINGLE_NORMS = ["layernorm", "rmsnorm"]
SINGLE_LRS = [1e-3, 3e-4]


def single_loss(norm, lr, seed):
    wobble = 0.003 * ((3 * seed + len(norm) + int(lr * 1e4)) % 4)
    return (
        3.0
        + (0.02 if norm == "rmsnorm" else 0.0)
        + 50 * abs(lr - BEST_LR)
        + ((1.2 if norm == "rmsnorm" else 1.0) * NOISE[seed] + wobble)
    )


def _log_singles(client):
    """bln-train -m norm=layernorm,rmsnorm optim.lr=1e-3,3e-4 seed=0,1,2 (no confirm runs)."""
    exp = client.create_experiment(SINGLE, artifact_location=ARTIFACTS)
    for norm in SINGLE_NORMS:
        for lr in SINGLE_LRS:
            for seed in SEEDS:
                _log(
                    client,
                    exp,
                    f"{norm} lr {lr} seed {seed}",
                    params=_params(norm, 8, 128, lr, seed),
                    tags={"kind": "single", "status": "finished", "leaky": "false"},
                    metrics={"val/loss": single_loss(norm, lr, seed)},
                )
    _log(
        client,
        exp,
        "still running",
        params=_params("layernorm", 8, 128, 1e-3, 5),
        tags={"kind": "single", "status": "running"},
        end="RUNNING",
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('analysis')}/mlflow.db"
    client = MlflowClient(uri)
    ids = _log_sweep(client)
    _log_singles(client)
    client.create_experiment("empty", artifact_location=ARTIFACTS)
    return {"uri": uri, "ids": ids}


@pytest.fixture(scope="module")
def runs(store):
    return load_runs(SWEEP, store["uri"], via="sql")


@pytest.fixture(scope="module")
def table(runs):
    return comparison_table(runs)


def _row(table, norm, batch, seq):
    t = table
    row = t[(t["norm.name"] == norm) & (t["batch.size"] == batch) & (t["seq.len"] == seq)]
    assert len(row) == 1
    return row.iloc[0]


# ---------------------------------------------------------------------------------------------
# Loading


def test_sql_and_client_paths_give_the_same_frame(store):
    for flt in ["", "tags.kind = 'confirm' and params.\"norm.name\" = 'bln'"]:
        fast = load_runs(SWEEP, store["uri"], flt, via="sql")
        slow = load_runs(SWEEP, store["uri"], flt, via="client")
        pd.testing.assert_frame_equal(fast, slow)
    assert len(fast) == 12 and set(fast["norm.name"]) == {"bln"}
    assert set(fast["kind"]) == {"confirm"}


def test_sqlalchemy_path_reads_the_same(store, runs):
    """The SQL path through SQLAlchemy (what postgresql:// and mysql:// stores use)."""
    via_sqlalchemy = store["uri"].replace("sqlite:", "sqlite+pysqlite:", 1)
    pd.testing.assert_frame_equal(load_runs(SWEEP, via_sqlalchemy, via="sql"), runs)
    run_id = store["ids"][("bln", 4, 128, "confirm", 1)]
    pd.testing.assert_frame_equal(
        load_history([run_id], "val/loss", via_sqlalchemy),
        load_history([run_id], "val/loss", store["uri"]),
    )


def test_runs_frame_casts_params_and_keeps_every_ending(runs):
    # 1 sweep + 12 cells + 12 x 3 trials + a failed and a diverged trial + 36 confirm; the
    # deleted run is left out, as MLflow's search does.
    assert len(runs) == 1 + 12 + 36 + 2 + 36
    assert runs["run_id"].is_unique
    assert str(runs["batch.size"].dtype) == "Int64"
    assert str(runs["seed"].dtype) == "Int64"
    assert runs["optim.lr"].dtype == "float64"
    assert str(runs["train.compile"].dtype) == "boolean"
    assert runs["data.path"].isna().all()  # "None"
    assert set(runs["eval.bln_switches"].dropna()) == {'["TTFF"]'}
    assert str(runs["leaky"].dtype) == "boolean" and str(runs["trial"].dtype) == "Int64"
    assert {"val/loss", "val/loss@batch", "val/loss@bln-TTFF"} <= set(runs.columns)
    assert not any(":" in c for c in runs.columns)
    counts = runs["status"].value_counts().to_dict()
    assert counts == {"finished": 36 * 2 - 1, "pruned": 1, "failed": 1, "diverged": 1}
    diverged = runs[runs["status"] == "diverged"].iloc[0]
    assert math.isnan(diverged["val/loss"])  # NaN logged, NaN read back (not 0)
    confirm = runs[runs["kind"] == "confirm"]
    assert confirm["parent_run_id"].notna().all()
    assert (confirm["mlflow_status"] == "FINISHED").all()


def test_unknown_experiment_and_missing_store(store, tmp_path):
    with pytest.raises(AnalysisError, match=r"no experiment 'nope'.*experiments: .*unit-sweep"):
        load_runs("nope", store["uri"])
    missing = tmp_path / "none.db"
    for via in ("sql", "client"):
        with pytest.raises(AnalysisError, match="no MLflow store"):
            load_runs(SWEEP, f"sqlite:///{missing}", via=via)
    assert not missing.exists()  # reading never creates a store


def test_load_history(store):
    run_id = store["ids"][("bln", 4, 128, "confirm", 1)]
    for via in ("sql", "client"):
        h = load_history([run_id], "val/loss", store["uri"], via=via)
        assert h["step"].tolist() == [10, 20, 40, 1000]
        assert h["value"].iloc[-1] == confirm_loss("bln", 4, 128, 1)
        assert h["value"].iloc[0] == confirm_loss("bln", 4, 128, 1) + 1.0 / 10


# ---------------------------------------------------------------------------------------------
# Statistics


def _cells():
    return [(n, b, s) for n in NORMS for b in BATCHES for s in SEQS]


def test_means_and_t_intervals_match_scipy(table):
    assert len(table) == 12
    for norm, batch, seq in _cells():
        x = np.array([confirm_loss(norm, batch, seq, s) for s in confirm_seeds(norm, batch, seq)])
        low, high = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
        row = _row(table, norm, batch, seq)
        assert row["n_seeds"] == 3 and row["n_replicates"] == 3
        assert row["mean"] == pytest.approx(x.mean(), rel=1e-12)
        assert row["std"] == pytest.approx(x.std(ddof=1), rel=1e-12)
        assert row["ci_low"] == pytest.approx(low, rel=1e-12)
        assert row["ci_high"] == pytest.approx(high, rel=1e-12)


def test_delta_and_p_values_match_scipy_paired_and_welch(table):
    for norm, batch, seq in _cells():
        row = _row(table, norm, batch, seq)
        if norm == "layernorm":
            assert row["test"] == "baseline" and np.isnan(row["p_value"])
            continue
        seeds = confirm_seeds(norm, batch, seq)
        x = np.array([confirm_loss(norm, batch, seq, s) for s in seeds])
        y = np.array([confirm_loss("layernorm", batch, seq, s) for s in SEEDS])
        if seeds == SEEDS:
            res, test = stats.ttest_rel(x, y), "paired"
        else:
            res, test = stats.ttest_ind(x, y, equal_var=False), "welch"
        low, high = res.confidence_interval(0.95)
        assert row["test"] == test
        assert row["delta"] == pytest.approx(x.mean() - y.mean(), rel=1e-12)
        assert row["p_value"] == pytest.approx(res.pvalue, rel=1e-9)
        assert (row["delta_ci_low"], row["delta_ci_high"]) == pytest.approx((low, high), rel=1e-9)
    assert (table["test"] == "welch").sum() == 1


def test_holm_by_hand_and_in_the_table(table):
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 -> max(0.06, 0.04) = 0.06
    got = holm([0.01, 0.04, 0.03, float("nan"), 0.005])
    np.testing.assert_allclose(got, [0.03, 0.06, 0.06, np.nan, 0.02], rtol=1e-12)
    # capped at 1 and monotone: 0.5 * 2 = 1.0, then max(1.0, 0.9 * 1) = 1.0
    np.testing.assert_array_equal(holm([0.5, 0.9]), [1.0, 1.0])
    p = table["p_value"].to_numpy(float)
    m = np.isfinite(p).sum()
    assert m == 8
    order = np.argsort(np.where(np.isfinite(p), p, np.inf))[:m]
    expected = np.maximum.accumulate([min(1.0, (m - i) * p[j]) for i, j in enumerate(order)])
    np.testing.assert_allclose(table["p_holm"].to_numpy(float)[order], expected, rtol=1e-12)
    sig = table["significant"]
    assert (sig.dropna() == (table["p_holm"].dropna() < 0.05)).all()
    assert sig.isna().sum() == 4  # the baseline rows


def test_ranks_leaky_counts_best_params_hours(table):
    for batch in BATCHES:
        for seq in SEQS:
            ranks = {n: _row(table, n, batch, seq)["rank"] for n in NORMS}
            assert ranks == {"bln": 1, "layernorm": 2, "batchnorm": 3}
    # sorted by regime, then rank
    assert table["rank"].tolist() == [1, 2, 3] * 4
    assert table["leaky"].tolist() == [n == "batchnorm" for n in table["norm.name"]]

    busy = _row(table, "bln", 4, 128)
    assert busy[["n_runs", "n_finished", "n_pruned", "n_diverged", "n_failed"]].tolist() == [
        8,
        5,
        1,
        1,
        1,
    ]
    assert busy["best_params"] == "optim.lr=0.0003"
    assert busy["best_value"] == trial_loss("bln", 4, 128, BEST_LR)
    assert busy["best_trial"] == 1
    # 6 runs x 1 h on CPU, the diverged trial's 60 s, the failed one's start-to-end 200 s
    assert busy["cpu_hours"] == pytest.approx(6 + 260 / 3600) and busy["gpu_hours"] == 0
    big = _row(table, "layernorm", 16, 256)
    assert big["gpu_hours"] == pytest.approx(6 * 2.0) and big["cpu_hours"] == 0
    x = np.array([confirm_loss("layernorm", 16, 256, s) for s in SEEDS])
    assert big["tokens_per_s"] == pytest.approx(np.mean(1000.0 + 10 * x), rel=1e-12)


def test_inference_mode_columns_side_by_side(table):
    bln = _row(table, "bln", 16, 128)
    ln = _row(table, "layernorm", 16, 128)
    x = np.array([confirm_loss("bln", 16, 128, s) for s in SEEDS])
    assert bln["val/loss@batch"] == pytest.approx(np.mean(batch_loss("bln", x)), rel=1e-12)
    assert bln["val/loss@bln-TTFF"] == pytest.approx(np.mean(x + 0.002), rel=1e-12)
    assert np.isnan(ln["val/loss@bln-TTFF"])
    assert bln["batch_gap"] == pytest.approx(-0.01, abs=1e-12)
    assert _row(table, "batchnorm", 4, 128)["batch_gap"] == pytest.approx(-0.05, abs=1e-12)


def test_other_metric_and_both_spellings(runs):
    at = comparison_table(runs, "val/loss@batch")
    colon = comparison_table(runs, "val/loss:batch")
    pd.testing.assert_frame_equal(at, colon)
    x = np.array([batch_loss("batchnorm", confirm_loss("batchnorm", 4, 128, s)) for s in SEEDS])
    assert _row(at, "batchnorm", 4, 128)["mean"] == pytest.approx(x.mean(), rel=1e-12)
    assert at.attrs["metric"] == "val/loss@batch" and "val/loss" in at.columns
    fast = comparison_table(runs, "perf/tokens_per_s", baseline=None)
    assert fast.attrs["higher_is_better"] and fast["delta"].isna().all()
    assert (fast.groupby(["batch.size", "seq.len"])["mean"].idxmax() == fast.index[::3]).all()


def test_single_runs_stand_in_for_confirm_runs(store):
    runs = load_runs(SINGLE, store["uri"])
    table = comparison_table(runs)
    assert table.attrs["replicates"] == "single"
    assert table.attrs["axes"] == ["norm.name", "batch.size", "seq.len", "optim.lr"]
    assert len(table) == 4
    for lr in SINGLE_LRS:
        t = table[table["optim.lr"] == lr]
        rms = t[t["norm.name"] == "rmsnorm"].iloc[0]
        x = np.array([single_loss("rmsnorm", lr, s) for s in SEEDS])
        y = np.array([single_loss("layernorm", lr, s) for s in SEEDS])
        assert rms["test"] == "paired"
        assert rms["p_value"] == pytest.approx(stats.ttest_rel(x, y).pvalue, rel=1e-9)
        assert rms["mean"] == pytest.approx(x.mean(), rel=1e-12)
    pooled = comparison_table(runs, axes=["norm.name"])  # given axes: pool the two lrs
    assert len(pooled) == 2 and pooled["n_seeds"].tolist() == [6, 6]
    x = [single_loss("layernorm", lr, s) for lr in SINGLE_LRS for s in SEEDS]
    assert pooled.loc[pooled["norm.name"] == "layernorm", "mean"].item() == pytest.approx(
        np.mean(x), rel=1e-12
    )
    assert pooled["test"].tolist().count("welch") == 1  # seeds repeat: no pairing
    ln = table[(table["norm.name"] == "layernorm") & (table["optim.lr"] == 1e-3)].iloc[0]
    assert ln["n_running"] == 1 and ln["n_seeds"] == 3
    assert np.isnan(ln["best_value"])  # no trials: no search to report


def test_bad_input_raises_with_what_exists(runs):
    with pytest.raises(AnalysisError, match=r"no run logged metric 'val/los'; metrics: .*val/loss"):
        comparison_table(runs, "val/los")
    with pytest.raises(AnalysisError, match=r"baseline norm 'rmsnorm'.*norms: batchnorm, bln, lay"):
        comparison_table(runs, baseline="rmsnorm")
    with pytest.raises(AnalysisError, match="axis 'optim.lrr' is not a param"):
        comparison_table(runs, axes=["norm.name", "optim.lrr"])
    with pytest.raises(AnalysisError, match="no training runs"):
        comparison_table(runs[runs["kind"] == "cell"])


def test_pivots(table):
    by_batch = pivot(table, "batch.size")
    assert list(by_batch.columns) == [4, 16]
    assert by_batch.index.names == ["norm.name", "seq.len"]
    assert by_batch.loc[("bln", 256), 16] == _row(table, "bln", 16, 256)["mean"]
    by_seq = pivot(table, "seq.len")
    assert by_seq.shape == (6, 2)
    with pytest.raises(AnalysisError, match="not an axis"):
        pivot(table, "optim.lr")


# ---------------------------------------------------------------------------------------------
# Exports and plots


def test_csv_and_json_parse_back_exactly(table):
    from analysis.export import render

    back = pd.read_csv(StringIO(render(table, "csv")), float_precision="round_trip")
    assert list(back.columns) == list(table.columns)
    for col in ["mean", "ci_low", "ci_high", "delta", "p_value", "p_holm", "gpu_hours"]:
        np.testing.assert_array_equal(back[col].to_numpy(float), table[col].to_numpy(float))
    assert back["norm.name"].tolist() == table["norm.name"].tolist()

    doc = json.loads(render(table, "json"))
    assert doc["meta"]["metric"] == "val/loss" and doc["meta"]["baseline"] == "layernorm"
    assert len(doc["rows"]) == len(table)
    for rec, (_, row) in zip(doc["rows"], table.iterrows(), strict=True):
        assert rec["mean"] == row["mean"] and rec["batch.size"] == row["batch.size"]
        assert rec["p_value"] == (None if np.isnan(row["p_value"]) else row["p_value"])
        assert rec["leaky"] == bool(row["leaky"])


def test_latex_markdown_html(table, runs):
    from analysis.export import render

    tex = render(table, "tex")
    for rule in ("\\toprule", "\\midrule", "\\bottomrule", "booktabs"):
        assert rule in tex
    best = table.loc[table["mean"].idxmin()]
    half = best["mean"] - best["ci_low"]
    assert f"\\textbf{{{best['mean']:.4f} $\\pm$ {half:.4f}}}" in tex
    assert "batchnorm $^\\dagger$" in tex and "\\_" not in tex.split("\\toprule")[0][:30]

    md = render(table, "md")
    assert f"**{best['mean']:.4f} ± {half:.4f}**" in md
    assert "† leaky" in md and "norm × micro-batch size" in md and "norm × sequence length" in md
    header = next(line for line in md.splitlines() if line.startswith("| norm"))
    assert "Δ vs layernorm" in header and "p Holm" in header and "GPU-h" in header

    # significance marks follow alpha; a Δ is bold only where it beats the baseline (Δ < 0)
    assert " * |" not in md
    assert " * |" in render(comparison_table(runs, alpha=0.1), "md")  # p Holm ~0.08
    assert not [c for c in md.split("|") if c.strip().startswith("**+")] and "**-0.0" in md

    html = render(table, "html")
    root = ET.fromstring(f"<div>{html}</div>")
    assert len(root.findall("table")) == 3
    assert root.find("table/tbody/tr/td") is not None and root.findall(".//b")


def test_plots_are_written(table, runs, store, tmp_path):
    from analysis.plots import plot_all

    confirm = runs[runs["kind"] == "confirm"]
    history = load_history(confirm["run_id"].tolist(), "val/loss", store["uri"])
    history = history.merge(confirm[["run_id", "norm.name", "batch.size", "seq.len"]], on="run_id")
    paths = plot_all(table, tmp_path, history)
    names = sorted(p.name for p in paths)
    stems = ["batch_gap", "heatmap_norm_batch", "learning_curves", "vs_batch", "vs_seq"]
    assert names == sorted(f"{s}.{e}" for s in stems for e in ("png", "svg"))
    for p in paths:
        if p.suffix == ".png":
            data = p.read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        else:
            root = ET.parse(p).getroot()
            assert root.tag.endswith("svg")
            text = p.read_text()
            assert "micro-batch size" in text or "optimizer step" in text or "norm" in text


# ---------------------------------------------------------------------------------------------
# The command line


def _cli(*args, cwd=ROOT):
    return subprocess.Popen(
        [sys.executable, "-m", "analysis", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_cli_tables_files_and_sweep_lookup(store, tmp_path):
    sweeps = tmp_path / "sweeps"
    (sweeps / SWEEP).mkdir(parents=True)
    (sweeps / SWEEP / "manifest.json").write_text(json.dumps({"tracking_uri": store["uri"]}))
    out = tmp_path / "out"
    procs = {
        "stdout": _cli(SWEEP, "--sweeps-dir", str(sweeps)),
        "files": _cli(
            SWEEP,
            "--tracking-uri",
            store["uri"],
            "--format",
            "csv,json,tex",
            "--out",
            str(out),
            "--metric",
            "val/loss:batch",
        ),
        "experiment": _cli(
            "--experiment",
            SINGLE,
            "--tracking-uri",
            store["uri"],
            "--filter",
            "params.\"optim.lr\" = '0.001'",
            "--format",
            "csv",
        ),
    }
    res = {k: (p.wait(60), *p.communicate()) for k, p in procs.items()}
    rc, stdout, stderr = res["stdout"]
    assert rc == 0, stderr
    assert (
        stdout.startswith("**val/loss: mean ± 95% t-interval") and "| bln | 4 | 128 | 1 |" in stdout
    )
    rc, _, stderr = res["files"]
    assert rc == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            f"{SWEEP}.csv",
            f"{SWEEP}.json",
            f"{SWEEP}.tex",
            f"{SWEEP}_by_batch.csv",
            f"{SWEEP}_by_seq.csv",
        ]
    )
    assert json.loads((out / f"{SWEEP}.json").read_text())["meta"]["metric"] == "val/loss@batch"
    rc, stdout, stderr = res["experiment"]
    assert rc == 0, stderr
    single = pd.read_csv(StringIO(stdout))
    assert sorted(single["norm.name"]) == SINGLE_NORMS and single["n_seeds"].tolist() == [3, 3]
    assert "optim.lr" not in single  # one value left in the selection: not an axis


def test_cli_bad_input_is_one_line_and_exit_2(store, tmp_path):
    uri = ["--tracking-uri", store["uri"]]
    cases = {
        "no sweep 'nope': sweeps in": _cli("nope", "--sweeps-dir", str(tmp_path)),
        "experiments: Default, empty, unit-single, unit-sweep": _cli(
            "nope", "--sweeps-dir", str(tmp_path), *uri
        ),
        "no experiment 'nope'": _cli("--experiment", "nope", *uri),
        "no run logged metric 'val/los'; metrics: perf/tokens_per_s": _cli(
            SWEEP, *uri, "--metric", "val/los"
        ),
        "baseline norm 'powernorm' is not in the selection; norms: batchnorm, bln, layernorm": (
            _cli(SWEEP, *uri, "--baseline", "powernorm")
        ),
        "no runs in experiment 'unit-sweep' match filter": _cli(
            SWEEP, *uri, "--filter", "params.\"norm.name\" = 'powernorm'"
        ),
        "no runs in experiment 'empty'": _cli("--experiment", "empty", *uri),
        "unknown format 'xls'; formats: md, csv, tex, html, json": _cli(
            SWEEP, *uri, "--format", "md,xls"
        ),
        "unrecognized arguments: --bogus": _cli(SWEEP, "--bogus"),
    }
    for expected, proc in cases.items():
        rc = proc.wait(60)
        stdout, stderr = proc.communicate()
        assert rc == 2, (expected, stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("bln-analyze: error: "), stderr
        assert expected in lines[0], lines[0]
        assert stdout == ""


def test_cli_help_does_not_import_pandas_or_torch():
    code = (
        "import sys; from analysis.cli import main\n"
        "try: main(['--help'])\n"
        "except SystemExit: pass\n"
        "bad = [m for m in ('pandas', 'torch', 'mlflow', 'matplotlib') if m in sys.modules]\n"
        "sys.exit(1 if bad else 0)"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "--metric" in p.stdout and "--baseline" in p.stdout


# ---- the search design in the tables: Holm families, edges, the held-out split ------------------


def test_holm_family_regime_corrects_each_regime_and_the_caption_says_which(runs, table):
    from analysis.export import render

    by_regime = comparison_table(runs, holm_family="regime")
    for _, g in by_regime.groupby(["batch.size", "seq.len"]):
        np.testing.assert_allclose(
            g["p_holm"].to_numpy(float), holm(g["p_value"].to_numpy(float)), rtol=1e-12
        )
    # one family per regime: fewer comparisons each, so never a larger adjusted p
    merged = table.merge(by_regime, on=["norm.name", "batch.size", "seq.len"])
    finite = merged["p_holm_x"].notna()
    assert (merged.loc[finite, "p_holm_y"] <= merged.loc[finite, "p_holm_x"] + 1e-15).all()
    assert (merged.loc[finite, "p_holm_y"] < merged.loc[finite, "p_holm_x"]).any()
    assert "Holm-adjusted p over all comparisons of the table" in render(table, "md")
    assert "Holm-adjusted p within each regime" in render(by_regime, "md")
    assert by_regime.attrs["holm_family"] == "regime"
    with pytest.raises(AnalysisError, match="holm family 'cells': valid choices: all, regime"):
        comparison_table(runs, holm_family="cells")


def test_best_value_at_an_edge_is_a_column_and_a_mark(runs):
    from analysis.export import EDGE_NOTE, render

    flagged = runs.copy()
    cell = "norm=bln,batch=b16,seq=s256"
    flagged["at_edge"] = None
    flagged.loc[(flagged["kind"] == "confirm") & (flagged["cell"] == cell), "at_edge"] = (
        "optim.lr:high"
    )
    t = comparison_table(flagged)
    assert t.loc[t["cell"] == cell, "at_edge"].tolist() == ["optim.lr:high"]
    assert set(t.loc[t["cell"] != cell, "at_edge"]) == {""}
    back = pd.read_csv(StringIO(render(t, "csv")), keep_default_na=False)
    assert back.loc[back["cell"] == cell, "at_edge"].tolist() == ["optim.lr:high"]
    assert json.loads(render(t, "json"))["rows"][0]["at_edge"] is not None
    md = render(t, "md")
    assert md.count(" ‡ |") == 1 and EDGE_NOTE in md
    assert "$^\\ddagger$" in render(t, "tex") and "‡" in render(t, "html")
    assert "‡" not in render(comparison_table(runs), "md")  # nothing flagged, no mark, no note


def test_tables_default_to_the_test_split_when_runs_logged_it(runs):
    from analysis.cli import _default_metric

    assert _default_metric(runs) == "val/loss"  # runs from before the split existed
    with_test = runs.copy()
    with_test["test/loss"] = with_test["val/loss"] + 0.01
    with_test["test/loss@batch"] = with_test["val/loss@batch"] + 0.01
    assert _default_metric(with_test) == "test/loss"
    t = comparison_table(with_test, metric="test/loss")
    assert {"val/loss", "val/loss@batch", "test/loss@batch"} <= set(t.columns)
    # the train/inference gap is taken on the split the table reports
    row = t.iloc[0]
    assert row["batch_gap"] == pytest.approx(row["test/loss@batch"] - row["mean"], abs=1e-9)
    # the best trial is the one the search selected (by val/loss), shown with its test/loss
    lucky = with_test["kind"].eq("trial") & with_test["optim.lr"].eq(TRIAL_LRS[0])
    with_test.loc[lucky, "test/loss"] = 0.0  # a worse trial on val that test data would pick
    t = comparison_table(with_test, metric="test/loss")
    finished = t["best_params"].notna()
    assert (t.loc[finished, "best_params"] == "optim.lr=0.0003").all()
    assert (t.loc[finished, "best_value"] > 0.0).all()
