"""What the sweep machinery costs and what it buys, measured with the real `bln-sweep`:

1. **Orchestration overhead per trial**: `bln-sweep` (one local worker: Optuna journal storage,
   config composed per trial, MLflow run per trial, heartbeats) vs a bare `optuna.Study.optimize`
   loop in one process calling the same `bln_sweeps.train.run` on the same near-trivial objective
   (tiny model, one optimizer step, tracking off). Per trial = span from the end of trial 0 to the
   end of the last trial / (n - 1), so process start-up and imports count for neither.
2. **Scaling**: trials per hour of `bln-sweep` with 1, 2 and 4 local workers on that objective.
3. **Search efficiency**: CPU-seconds to reach the best test loss of a batch-synchronous,
   no-pruning search with the same budget (what Hydra's Optuna sweeper does with its default
   TPE: ask `n_jobs` trials, run them in parallel, wait for all, tell, repeat), vs `bln-sweep`
   (workers pull trials, median pruner, start-up trials sized by the budget). Both select on
   val/loss and are scored on test/loss; both track every trial in MLflow. Same sampler seed,
   space, training task and worker count.

    python benchmarks/sweep.py [--quick] [--write]
    python benchmarks/sweep.py --search-only [--budget 24] [--seeds 1]   # part 3 alone

Each worker process gets one torch thread in both set-ups (this machine has 2 cores).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from machine import describe

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("OMP_NUM_THREADS", "1")

TRIVIAL = [  # the near-trivial objective: one optimizer step on the tiny model
    "train.steps=1",
    "train.eval_interval=1",
    "eval.tokens=512",
    "train.log_interval=1",
    "train.checkpoint_interval=1000",
    "batch=b4",
    "batch.tokens_per_step=256",
    "seq.len=64",
    "data.n_train_tokens=20000",
    "data.n_val_tokens=4000",
]
TASK = [  # the search-efficiency task: long enough that pruning has something to save
    "norm=bln",
    "batch=b4",
    "train.steps=60",
    "train.eval_interval=10",
    "eval.tokens=1024",
    "train.log_interval=10",
    "train.checkpoint_interval=1000",
    "batch.tokens_per_step=512",
    "seq.len=64",
    "data.n_train_tokens=60000",
    "data.n_val_tokens=8000",
]
LR_SPACE = "tag(log, interval(1e-5, 3e-2))"  # wide: many hopeless trials, as in real sweeps


def sweep(
    work: Path, name: str, overrides: list[str], n: int, workers: int, pruner: str, seed: int = 0
) -> list:
    """Run `bln-sweep` to completion; its search trials, finished ones only (each with its run's
    logged test/loss as the user attribute `test_loss`, when it has one)."""
    import optuna

    from bln_sweeps.sweep.manifest import load_manifest
    from bln_sweeps.sweep.space import open_storage, study_names

    cmd = [
        sys.executable,
        "-m",
        "launchers",
        f"sweep.name={name}",
        "sweep.grid={norm: layernorm}",
        f"search.n_trials={n}",
        "search.confirm_seeds=0",
        f"search.pruner={pruner}",
        f"search.params={{optim.lr: '{LR_SPACE}'}}",
        f"search.seed={seed}",
        f"launcher.workers={workers}",
        *overrides,
    ]
    p = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"bln-sweep failed:\n{p.stdout}\n{p.stderr}")
    sweep_dir = work / "sweeps" / name
    m = load_manifest(sweep_dir)
    storage = open_storage(m["storage_url"], sweep_dir)
    (cell,) = m["cells"]
    study = optuna.load_study(study_name=study_names(name, cell["name"])[0], storage=storage)
    trials = [t for t in study.get_trials() if t.state.is_finished() and t.datetime_complete]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=m["tracking_uri"])
    for t in trials:
        run_id = t.user_attrs.get("mlflow_run_id")
        metrics = client.get_run(run_id).data.metrics if run_id else {}
        t.user_attrs["test_loss"] = metrics.get("test/loss")
    return trials


def per_trial_s(starts_ends: list[tuple[float, float]]) -> float:
    """Span from the end of the first trial to the end of the last, per trial after the first."""
    ends = sorted(e for _, e in starts_ends)
    return (ends[-1] - ends[0]) / (len(ends) - 1)


def stamps(trials) -> list[tuple[float, float]]:
    return [(t.datetime_start.timestamp(), t.datetime_complete.timestamp()) for t in trials]


def compose_run(overrides: list[str], lr: float, out: str, tracking: str | None = None):
    """A run config; tracking off, or into the MLflow store `tracking` (as bln-sweep tracks)."""
    from bln_sweeps.compose import compose
    from bln_sweeps.config import to_run_config, validate

    cfg = validate(
        to_run_config(compose([*overrides, f"optim.lr={lr!r}", f"train.out_dir={out}"], "train"))
    )
    cfg.tracking.enabled = tracking is not None
    if tracking is not None:
        cfg.tracking.uri, cfg.tracking.experiment = tracking, "batch-synchronous"
    return cfg


def bare_loop(n: int, out: Path) -> list[tuple[float, float]]:
    """`optuna.Study.optimize` on the same objective, in this process, nothing else."""
    import optuna

    from bln_sweeps.train import run

    cfg0 = compose_run(TRIVIAL, 1e-3, str(out))
    times = []

    def objective(trial):
        lr = trial.suggest_float("optim.lr", 1e-5, 3e-2, log=True)
        t0 = time.time()
        cfg0.optim.lr = lr
        cfg0.seed = trial.number  # a fresh run key, so nothing is resumed
        result = run(cfg0, run_dir=out / f"t{trial.number}")
        times.append((t0, time.time()))
        return result["val/loss"]

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0)).optimize(objective, n)
    return times


def _train_one(args: tuple[list[str], float, str, str]) -> tuple[float, float, float, float]:
    import torch

    torch.set_num_threads(1)
    from bln_sweeps.train import run

    overrides, lr, out, tracking = args
    t0 = time.time()
    result = run(compose_run(overrides, lr, out, tracking), run_dir=Path(out))
    return result["val/loss"], result["test/loss"], t0, time.time()


def batch_synchronous(
    n: int, n_jobs: int, out: Path, seed: int = 0
) -> list[tuple[float, float, float]]:
    """Hydra's Optuna sweeper, reproduced: ask n_jobs, run them in parallel, wait for all, tell
    val/loss. No pruning (the sweeper cannot prune); its default TPE (10 start-up trials); every
    trial tracked in MLflow as bln-sweep tracks its trials. Returns (test/loss, start, end) per
    trial."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
    dist = optuna.distributions.FloatDistribution(1e-5, 3e-2, log=True)
    done = []
    tracking = f"sqlite:///{out}/mlflow.db"
    out.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(n_jobs) as pool:
        while len(done) < n:
            batch = [study.ask({"optim.lr": dist}) for _ in range(min(n_jobs, n - len(done)))]
            jobs = [
                (TASK, t.params["optim.lr"], str(out / f"t{t.number}"), tracking) for t in batch
            ]
            results = list(pool.map(_train_one, jobs))  # the barrier: wait for the whole batch
            for t, (value, test, t0, t1) in zip(batch, results, strict=True):
                study.tell(t, value)
                done.append((test, t0, t1))
    return done


def cpu_seconds_to_reach(trials: list[tuple[float | None, float, float]], target: float):
    """CPU-seconds spent (one core per trial) until a finished trial reaches `target`, in the
    order trials finished; None if none does."""
    spent = 0.0
    for value, t0, t1 in sorted(trials, key=lambda v: v[2]):
        spent += t1 - t0
        if value is not None and value <= target + 1e-12:
            return spent
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small budgets (a smoke run)")
    ap.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    ap.add_argument("--search-only", action="store_true", help="run part 3 only; print JSON")
    ap.add_argument("--budget", type=int, default=24, help="trials per search (part 3)")
    ap.add_argument("--seeds", type=int, default=3, help="sampler seeds (part 3)")
    ap.add_argument("--first-seed", type=int, default=0, help="first sampler seed (part 3)")
    args = ap.parse_args()
    n_overhead, n_scale = (6, 20) if args.quick else (16, 40)
    n_search, n_seeds = (6, 1) if args.quick else (args.budget, args.seeds)
    work = Path(tempfile.mkdtemp(prefix="bln-bench-sweep-"))
    facts: dict = {"machine": describe("1 torch thread per worker")}
    if args.search_only:
        print(json.dumps({"machine": facts["machine"], "budget": n_search}), flush=True)
        search_efficiency(work, n_search, n_seeds, args.first_seed)
        return

    # 1. overhead: interleave ours and bare twice, medians
    ours, bare = [], []
    for rep in range(2):
        ours.append(per_trial_s(stamps(sweep(work, f"ovh{rep}", TRIVIAL, n_overhead, 1, "none"))))
        bare.append(per_trial_s(bare_loop(n_overhead, work / f"bare{rep}")))
    facts["overhead"] = {
        "bln_sweep_s_per_trial": statistics.median(ours),
        "bare_optuna_s_per_trial": statistics.median(bare),
        "overhead_s_per_trial": statistics.median(ours) - statistics.median(bare),
        "n_trials": n_overhead,
    }
    print(json.dumps(facts["overhead"]), flush=True)

    # 2. scaling, in the steady state: from the moment every worker has finished its first
    # trial (start-up and imports are behind them all) to the last trial's end
    facts["scaling"] = {}
    for workers in (1, 2, 4):
        trials = sweep(work, f"scale{workers}", TRIVIAL, n_scale * workers, workers, "none")
        firsts: dict = {}
        for t in trials:
            w, end = t.user_attrs["worker"], t.datetime_complete.timestamp()
            firsts[w] = min(firsts.get(w, end), end)
        t0 = max(firsts.values())
        ends = [t.datetime_complete.timestamp() for t in trials]
        after = [e for e in ends if e > t0]
        if not after:
            raise SystemExit(f"{workers} workers: no trial ended after every worker's first one")
        facts["scaling"][workers] = 3600 * len(after) / (max(ends) - t0)
    print(json.dumps(facts["scaling"]), flush=True)

    facts["search"] = search_efficiency(work, n_search, n_seeds)
    if args.write:
        write(facts, quick=args.quick)


def search_efficiency(work: Path, n_search: int, n_seeds: int, first_seed: int = 0) -> dict:
    """Part 3: 2 workers each, one pair of searches per sampler seed, run side by side in time
    (the batch-synchronous search first, then ours, per seed)."""
    runs = []
    for seed in range(first_seed, first_seed + n_seeds):
        base = batch_synchronous(n_search, 2, work / f"sync{seed}", seed)
        best = min(v for v, _, _ in base if v is not None)
        pulled = sweep(work, f"pull{seed}", TASK, n_search, 2, "median", seed)
        ours3 = [
            (t.user_attrs.get("test_loss"), *ts)
            for t, ts in zip(pulled, stamps(pulled), strict=True)
        ]
        base_cost = cpu_seconds_to_reach(base, best)
        our_cost = cpu_seconds_to_reach(ours3, best)
        runs.append(
            {
                "seed": seed,
                "sync_best": best,
                "sync_cpu_s_to_best": base_cost,
                "sync_cpu_s_total": sum(t1 - t0 for _, t0, t1 in base),
                "ours_best": min(v for v, _, _ in ours3 if v is not None),
                "ours_cpu_s_to_sync_best": our_cost,
                "ours_cpu_s_total": sum(t1 - t0 for _, t0, t1 in ours3),
                "ours_pruned": sum(t.state.name == "PRUNED" for t in pulled),
                "ratio": None if our_cost is None else our_cost / base_cost,
            }
        )
        print(json.dumps(runs[-1]), flush=True)
    return {"budget": n_search, "runs": runs}


def write(facts: dict, quick: bool) -> None:
    o, sc, se = facts["overhead"], facts["scaling"], facts["search"]
    ratios = [r["ratio"] for r in se["runs"]]
    reached = [r for r in ratios if r is not None]
    median = f"{statistics.median(reached):.2f}×" if reached else "not reached"
    lines = [
        "## Sweep orchestration (`benchmarks/sweep.py`)",
        "",
        f"Machine: {facts['machine']}; {time.strftime('%Y-%m-%d')}. Shared: read the ratios."
        + (" `--quick` budgets." if quick else ""),
        "",
        "| measure | bln-sweep | reference | result |",
        "|---|---|---|---|",
        f"| seconds per trial, near-trivial objective ({o['n_trials']} trials, 1 worker) "
        f"| {o['bln_sweep_s_per_trial']:.2f} | bare `Study.optimize`: "
        f"{o['bare_optuna_s_per_trial']:.2f} | overhead **{o['overhead_s_per_trial']:.2f} "
        "s/trial** (goal ≤ 0.5) |",
        f"| trials/hour in the steady state, 1 / 2 / 4 local workers | {sc[1]:.0f} / {sc[2]:.0f}"
        f" / {sc[4]:.0f} | | ×{sc[2] / sc[1]:.2f} / ×{sc[4] / sc[1]:.2f} of 1 worker (2 cores) |",
        f"| CPU-s to the best test/loss of a batch-synchronous no-pruning search ({se['budget']} "
        f"trials, 2 workers; median of {len(ratios)} sampler seeds) | | | **{median}** of its "
        "cost (goal ≤ 0.5×) |",
        "",
        "| seed | batch-sync best | its CPU-s to best / total | bln-sweep best | CPU-s to "
        "that value / total | pruned | ratio |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {r['seed']} | {r['sync_best']:.4f} | {r['sync_cpu_s_to_best']:.0f} / "
            f"{r['sync_cpu_s_total']:.0f} | {r['ours_best']:.4f} | "
            f"{_num(r['ours_cpu_s_to_sync_best'])} / {r['ours_cpu_s_total']:.0f} | "
            f"{r['ours_pruned']} | {_times(r['ratio'])} |"
            for r in se["runs"]
        ),
        "",
    ]
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    head = lines[0]
    if head in text:
        start = text.index(head)
        end = text.find("\n## ", start + 1)
        text = text[:start] + "\n".join(lines) + (text[end + 1 :] if end != -1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(lines)
    path.write_text(text)


def _times(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}×"


def _num(v: float | None) -> str:
    return "—" if v is None else f"{v:.0f}"


if __name__ == "__main__":
    main()
