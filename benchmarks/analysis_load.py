"""How long the comparison table of a 10,000-run sweep takes to build, and MLflow's own
search_runs on the same store for comparison.

    python benchmarks/analysis_load.py [--runs 10000] [--repeats 3] [--skip-mlflow] [--keep DIR]

The store is created by MLflow (so its migrations run and the schema is its own), then a sweep
is bulk-inserted with SQL: 60 cells (5 norms x 4 micro-batch sizes x 3 sequence lengths), each
with its parent run, ~160 Optuna trials (finished / pruned / failed / diverged) and 3 confirm
seeds, every run with ~45 params, ~25 tags, 8-12 final metrics and a short metric history, as
bln-sweep writes them. MLflow's search_runs must read the same runs back (checked).

Timed, in one process: analysis.load_runs (SQL path) + comparison_table; the same through the
MlflowClient path; `bln-analyze` end to end in a fresh process (imports included); and MLflow's
own MlflowClient.search_runs paged 1000 at a time (its default) and 50,000 at a time (its
maximum), and the fluent mlflow.search_runs (pandas output).
"""

import argparse
import math
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from machine import describe

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EXPERIMENT = "bench-10k"
NORMS = ["layernorm", "rmsnorm", "batchnorm", "bln", "powernorm"]
BATCHES = [4, 8, 16, 32]
SEQS = [1024, 2048, 4096]
SEEDS = [0, 1, 2]
BASE = {"layernorm": 3.30, "rmsnorm": 3.31, "batchnorm": 3.42, "bln": 3.28, "powernorm": 3.33}
LEAKY = {"batchnorm", "powernorm"}
T0 = 1_760_000_000_000  # ms


def config_params(norm: str, batch: int, seq: int, lr: float, wd: float, seed: int) -> dict:
    """A flattened resolved run config, as bln-train logs it (about 45 keys)."""
    p = {
        "model.name": "gpt2_124m",
        "model.block_size": 4096,
        "model.vocab_size": 50257,
        "model.n_layer": 12,
        "model.n_head": 12,
        "model.n_embd": 768,
        "model.dropout": 0.0,
        "model.bias": True,
        "norm.name": norm,
        "norm.final": None,
        "batch.size": batch,
        "batch.tokens_per_step": 524288,
        "seq.len": seq,
        "optim.name": "adamw",
        "optim.lr": lr,
        "optim.min_lr_frac": 0.1,
        "optim.warmup_frac": 0.04,
        "optim.beta1": 0.9,
        "optim.beta2": 0.95,
        "optim.eps": 1e-08,
        "optim.weight_decay": wd,
        "optim.grad_clip": 1.0,
        "data.name": "tokens",
        "data.path": "/data/fineweb10B",
        "data.vocab_size": 50257,
        "data.n_train_tokens": 2000000,
        "data.n_val_tokens": 200000,
        "data.seed": 1234,
        "train.steps": 5000,
        "train.eval_interval": 500,
        "eval.tokens": 1048576,
        "train.log_interval": 10,
        "train.device": "auto",
        "train.dtype": "auto",
        "train.compile": True,
        "train.checkpoint_interval": 1000,
        "train.out_dir": "runs",
        "train.resume": True,
        "train.diverge_loss": 0.0,
        "eval.batch_stats": True,
        "eval.bln_switches": '["TTFF", "FFFF", "TTTT", "FFTT"]' if norm == "bln" else "[]",
        "seed": seed,
    }
    if norm == "bln":
        p.update(
            {"norm.options.stats": "ema", "norm.options.zeta": 0.0001, "norm.options.eps": 1e-3}
        )
    if norm == "powernorm":
        p.update({"norm.options.warmup_steps": "None", "norm.options.backward_scale": "batch"})
    return {k: str(v) for k, v in p.items()}


def provenance(i: int) -> dict:
    return {
        "git.sha": "3f1c2d9e8b7a6f5e4d3c2b1a0f9e8d7c6b5a4f3e",
        "git.dirty": "false",
        "host": f"gpu-node-{i % 16:02d}",
        "python": "3.11.9",
        "version.torch": "2.13.0",
        "version.mlflow": "3.17.2",
        "version.optuna": "5.0.0",
        "version.hydra-core": "1.3.8",
        "version.numpy": "2.3.1",
        "version.bln-sweeps": "0.1.0",
        "slurm.job_id": str(4_000_000 + i // 40),
        "device": "cuda:NVIDIA H100 80GB HBM3",
        "n_devices": "1",
        "mlflow.user": "researcher",
        "mlflow.source.type": "LOCAL",
        "mlflow.source.name": "bln_sweeps/sweep/worker.py",
    }


def generate(db: Path, n_runs: int, exp_id: int, seed: int = 0) -> dict:
    """Insert a sweep of n_runs runs into MLflow's tables; returns counts by kind."""
    rng = random.Random(seed)
    cells = [(n, b, s) for n in NORMS for b in BATCHES for s in SEQS]
    n_trials = n_runs - 1 - len(cells) * (1 + len(SEEDS))
    per_cell = [n_trials // len(cells) + (i < n_trials % len(cells)) for i in range(len(cells))]
    runs, tags, params, latest, history = [], [], [], [], []
    artifact = f"{db.parent}/mlartifacts/{EXPERIMENT}"

    def run(name: str, t: int, status: str = "FINISHED") -> str:
        rid = uuid.uuid4().hex
        runs.append(
            (
                rid,
                name,
                "UNKNOWN",
                "",
                "",
                "researcher",
                status,
                T0 + t,
                T0 + t + 3_600_000,
                "",
                "active",
                f"{artifact}/{rid}/artifacts",
                exp_id,
                None,
            )
        )
        tags.append(("mlflow.runName", name, rid))
        return rid

    def metrics(rid: str, values: dict, t: int, last_step: int) -> None:
        for k, v in values.items():
            nan = isinstance(v, float) and math.isnan(v)
            row = (k, 0.0 if nan else v, T0 + t, last_step, int(nan), rid)
            latest.append(row)
            history.append((k, 0.0 if nan else v, T0 + t, rid, last_step, int(nan)))
        for step in range(500, last_step, 500):  # the learning curve: val/loss per eval
            v = values["val/loss"]
            v = 0.0 if math.isnan(v) else v + 2.0 / math.sqrt(step)
            history.append(("val/loss", v, T0 + t - (last_step - step), rid, step, 0))
            history.append(("train/loss", v + 0.01, T0 + t - (last_step - step), rid, step, 0))

    counts = {"sweep": 1, "cell": 0, "trial": 0, "confirm": 0}
    sweep = run("sweep big", 0)
    tags += [("kind", "sweep", sweep), ("sweep", EXPERIMENT, sweep)]
    t = 0
    for (norm, batch, seq), k in zip(cells, per_cell, strict=True):
        name = f"norm={norm},batch=b{batch},seq=s{seq}"
        cell = run(name, t)
        counts["cell"] += 1
        tags += [("kind", "cell", cell), ("sweep", EXPERIMENT, cell), ("cell", name, cell)]
        tags.append(("mlflow.parentRunId", sweep, cell))
        regime = 0.015 * math.log2(batch / 4) - 0.02 * math.log2(seq / 1024)
        best_lr = 6e-4 * (batch / 8) ** 0.25
        best = (math.inf, None)
        for trial in range(k + len(SEEDS)):
            confirm = trial >= k
            t += 1000
            if confirm:
                lr, wd, s = best[1], 0.1, SEEDS[trial - k]
                status = "finished"
            else:
                lr, wd, s = 10 ** rng.uniform(-4, -2.5), rng.choice([0.0, 0.05, 0.1]), 0
                u = rng.random()
                status = (
                    "finished"
                    if u < 0.75
                    else "pruned"
                    if u < 0.9
                    else "failed"
                    if u < 0.96
                    else "diverged"
                )
            loss = BASE[norm] + regime + 0.08 * math.log(lr / best_lr) ** 2 + rng.gauss(0, 0.01)
            kind = "confirm" if confirm else "trial"
            label = f"confirm seed {s}" if confirm else f"trial {trial}"
            rid = run(
                f"{norm} · b{batch} · s{seq} · {label}",
                t,
                "FAILED" if status == "failed" else "FINISHED",
            )
            counts[kind] += 1
            for key, v in {
                **provenance(trial),
                "kind": kind,
                "sweep": EXPERIMENT,
                "cell": name,
                "trial": str(trial),
                "leaky": str(norm in LEAKY).lower(),
                "status": status,
                "run_key": uuid.uuid4().hex[:12],
                "n_params": "124439808",
                "optuna.study": f"{EXPERIMENT}/{name}/{kind}",
                "mlflow.parentRunId": cell,
                **(
                    {"status_reason": "pruned by median at step 1500"} if status == "pruned" else {}
                ),
                **({"status_reason": "RuntimeError: CUDA error"} if status == "failed" else {}),
            }.items():
                tags.append((key, v, rid))
            params += [
                (key, v, rid) for key, v in config_params(norm, batch, seq, lr, wd, s).items()
            ]
            if status == "failed":
                continue
            last = 5000 if status in ("finished", "diverged") else 1500
            val = math.nan if status == "diverged" else loss
            m = {
                "train/loss": loss - 0.02,
                "train/lr": lr * 0.1,
                "train/grad_norm": 0.3 + rng.random(),
                "perf/tokens_per_s": 180_000 * (1 + 0.1 * rng.random()),
                "perf/mfu": 0.4,
                "perf/wall_s": 3600.0 * last / 5000,
                "val/loss": val,
                "val/loss:batch": val - (0.05 if norm in LEAKY else 0.005),
            }
            if norm == "bln":
                m.update(
                    {
                        f"val/loss:bln-{c}": val + 0.001 * i
                        for i, c in enumerate(["TTFF", "FFFF", "TTTT", "FFTT"])
                    }
                )
            metrics(rid, m, t, last)
            if status == "finished" and not confirm and loss < best[0]:
                best = (loss, lr)

    con = sqlite3.connect(db)
    with con:
        con.executemany(f"INSERT INTO runs VALUES ({','.join('?' * 14)})", runs)
        con.executemany("INSERT INTO tags (key, value, run_uuid) VALUES (?, ?, ?)", tags)
        con.executemany("INSERT INTO params (key, value, run_uuid) VALUES (?, ?, ?)", params)
        con.executemany(
            "INSERT INTO latest_metrics (key, value, timestamp, step, is_nan, run_uuid) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            latest,
        )
        con.executemany(
            "INSERT INTO metrics (key, value, timestamp, run_uuid, step, is_nan) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            history,
        )
    con.close()
    counts.update(rows_params=len(params), rows_tags=len(tags), rows_history=len(history))
    return counts


def machine() -> str:
    import mlflow
    import pandas

    return describe(
        f"mlflow {mlflow.__version__}",
        f"pandas {pandas.__version__}",
        f"SQLite {sqlite3.sqlite_version}",
    )


def timed(fn, repeats: int = 1):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3, help="repeats of the fast path")
    ap.add_argument("--skip-mlflow", action="store_true", help="skip MLflow's own search_runs")
    ap.add_argument("--keep", help="build the store in this directory and keep it")
    args = ap.parse_args()

    from mlflow.tracking import MlflowClient

    from analysis import comparison_table, load_runs

    folder = Path(args.keep or tempfile.mkdtemp(prefix="bench-analysis-"))
    folder.mkdir(parents=True, exist_ok=True)
    db = folder / "mlflow.db"
    if db.exists():
        db.unlink()
    uri = f"sqlite:///{db}"
    t = time.perf_counter()
    client = MlflowClient(uri)  # creates the store and runs MLflow's migrations
    exp_id = client.create_experiment(EXPERIMENT, artifact_location=str(folder / "mlartifacts"))
    create_s = time.perf_counter() - t
    counts, (gen_s,) = timed(lambda: generate(db, args.runs, int(exp_id)))
    print(f"machine: {machine()}")
    print(f"store: {db} ({db.stat().st_size / 2**20:.0f} MiB), created in {create_s:.1f} s")
    print(f"generated in {gen_s:.1f} s: {counts}")

    def ours(via: str):
        runs = load_runs(EXPERIMENT, uri, via=via)
        return runs, comparison_table(runs)

    (runs, table), fast = timed(lambda: ours("sql"), args.repeats)
    assert len(runs) == args.runs, len(runs)
    assert len(table) == len(NORMS) * len(BATCHES) * len(SEQS), len(table)
    load_s = min(timed(lambda: load_runs(EXPERIMENT, uri, via="sql"), args.repeats)[1])
    cli = [sys.executable, "-m", "analysis", EXPERIMENT, "--tracking-uri", uri, "--format", "csv"]
    (proc, cli_s) = timed(lambda: subprocess.run(cli, cwd=ROOT, capture_output=True, text=True))
    assert proc.returncode == 0, proc.stderr
    rows = [
        ("analysis.load_runs (SQL) + comparison_table", fast),
        ("  of which load_runs (SQL)", [load_s]),
        ("bln-analyze end to end (fresh process, CSV to stdout)", cli_s),
    ]
    if not args.skip_mlflow:
        (slow_runs, _), client_s = timed(lambda: ours("client"))
        from pandas.testing import assert_frame_equal

        assert_frame_equal(runs, slow_runs)  # both paths, the same frame

        def paged(page: int) -> list:
            out, token = [], None
            while True:
                res = client.search_runs([exp_id], max_results=page, page_token=token)
                out += res
                token = res.token
                if not token:
                    return out

        mlflow_1000, s_1000 = timed(lambda: paged(1000))
        assert len(mlflow_1000) == args.runs  # MLflow reads back every inserted run
        probe = next(r for r in mlflow_1000 if r.data.tags.get("kind") == "confirm")
        mine = runs.set_index("run_id").loc[probe.info.run_id]
        assert float(probe.data.params["optim.lr"]) == mine["optim.lr"]
        assert probe.data.metrics["val/loss"] == mine["val/loss"]
        _, s_50000 = timed(lambda: paged(50_000))
        import mlflow

        mlflow.set_tracking_uri(uri)
        frame, s_fluent = timed(lambda: mlflow.search_runs(experiment_names=[EXPERIMENT]))
        assert len(frame) == args.runs
        rows += [
            ("analysis.load_runs (MlflowClient path) + comparison_table", client_s),
            ("MLflow MlflowClient.search_runs, paged 1000/page (default)", s_1000),
            ("MLflow MlflowClient.search_runs, 50000/page (max)", s_50000),
            ("MLflow mlflow.search_runs -> pandas", s_fluent),
        ]
    print(f"\n{args.runs} runs, {len(table)} cells\n")
    print("| what | seconds |")
    print("|---|---:|")
    for what, times in rows:
        shown = (
            f"{min(times):.2f}"
            if len(times) == 1
            else (f"{min(times):.2f} (best of {len(times)}; first {times[0]:.2f})")
        )
        print(f"| {what} | {shown} |")


if __name__ == "__main__":
    main()
