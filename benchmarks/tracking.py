"""What metric logging costs the training loop: RunLogger vs. a synchronous log_batch per step.

    python benchmarks/tracking.py [--steps 2000] [--metrics 5] [--uri sqlite:///...]

Reports, per training step, the time the loop spends inside the logging call (that is what
slows training) and how long end() then takes to deliver the rest. Defaults to a fresh SQLite
store in a temporary directory; pass --uri http://127.0.0.1:5000 to measure a server.
"""

import argparse
import tempfile
import time
from pathlib import Path


def per_step_us(fn, steps: int) -> float:
    t = time.perf_counter()
    for step in range(steps):
        fn(step)
    return (time.perf_counter() - t) / steps * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--metrics", type=int, default=5, help="metrics logged per step")
    ap.add_argument("--uri", default=None)
    args = ap.parse_args()

    from mlflow.entities import Metric

    from bln_sweeps.tracking import RunLogger, tracking_client
    from bln_sweeps.tracking.contract import metric_key

    uri = args.uri or f"sqlite:///{Path(tempfile.mkdtemp()) / 'mlflow.db'}"
    names = [f"train/m{i}" for i in range(args.metrics - 1)] + ["val/loss@batch"]
    row = lambda step: {n: 1.0 / (step + 1) for n in names}  # noqa: E731

    null = RunLogger.disabled()
    null_us = per_step_us(lambda s: null.log_metrics(row(s), step=s), args.steps)

    logger = RunLogger.start(uri, "bench-tracking", run_name="RunLogger")
    async_us = per_step_us(lambda s: logger.log_metrics(row(s), step=s), args.steps)
    t = time.perf_counter()
    logger.end()
    drain_s = time.perf_counter() - t

    client = tracking_client(uri)
    sync_run = client.create_run(logger.experiment_id, run_name="log_batch per step").info.run_id

    def sync(step: int) -> None:
        ts = int(time.time() * 1000)
        metrics = [Metric(metric_key(n), v, ts, step) for n, v in row(step).items()]
        client.log_batch(sync_run, metrics=metrics, synchronous=True)

    sync_us = per_step_us(sync, args.steps)
    client.set_terminated(sync_run)

    n = len(client.get_metric_history(logger.run_id, metric_key(names[-1])))
    assert n == args.steps, f"RunLogger delivered {n} of {args.steps} steps"
    print(f"{args.steps} steps x {args.metrics} metrics, {uri}")
    print("| logging | in the loop, per step | after the loop |")
    print("|---|---|---|")
    print(f"| disabled (NullRunLogger) | {null_us:.1f} µs | - |")
    print(f"| RunLogger.log_metrics | {async_us:.1f} µs | end(): {drain_s:.2f} s |")
    print(f"| MlflowClient.log_batch, sync | {sync_us:.1f} µs | - |")


if __name__ == "__main__":
    main()
