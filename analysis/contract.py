"""The MLflow contract seen from the reading side: run kinds, statuses, tags, metric spelling.

The trainer and the sweep write runs this way (bln_sweeps.tracking owns the writing side). These
few names are repeated here on purpose, so that analysis imports nothing of the training stack.
"""

from __future__ import annotations

# Tag `kind`: what a run is. Confirm runs (the best config of a cell re-run with several seeds)
# are the seed replicates the tables rank; plain bln-train runs stand in when a sweep has none.
SWEEP, CELL, TRIAL, CONFIRM, SINGLE = "sweep", "cell", "trial", "confirm", "single"
TRAINING_KINDS = (TRIAL, CONFIRM, SINGLE)  # runs that trained a model (not parent runs)

# Tag `status`: how a training run ended. Anything else (e.g. "running") counts as running.
FINISHED, PRUNED, DIVERGED, FAILED, PREEMPTED = (
    "finished",
    "pruned",
    "diverged",
    "failed",
    "preempted",
)

# Tags that become plain columns of the runs frame, with their types; every other tag becomes
# `tags.<key>`. MLflow's own `mlflow.parentRunId` becomes `parent_run_id`.
TAG_COLUMNS = {
    "kind": "str",
    "status": "str",
    "status_reason": "str",
    "sweep": "str",
    "cell": "str",
    "trial": "Int64",
    "leaky": "boolean",
    "device": "str",
    "n_devices": "Int64",
    "at_edge": "str",  # confirm runs: searched keys whose best value is at an edge of the range
}
PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"

# The grid axes every table has (when the runs carry them), as dotted config paths.
NORM, BATCH, SEQ, SEED = "norm.name", "batch.size", "seq.len", "seed"
MAIN_AXES = (NORM, BATCH, SEQ)

HEADLINE_METRIC = "val/loss"  # validation loss with population statistics (model.eval())
TEST_METRIC = "test/loss"  # the held-out split a sweep's tables report (selection never reads it)
SPLITS = ("val", "test")  # val: selection (search, pruner); test: reporting
HOLM_FAMILIES = ("all", "regime")  # one family for the whole table, or one per batch/seq regime
BATCH_STATS_METRIC = "val/loss@batch"  # train-mode forward: current-batch statistics
TOKENS_PER_S = "perf/tokens_per_s"
WALL_S = "perf/wall_s"
HIGHER_IS_BETTER = ("perf/tokens_per_s", "perf/mfu")


class AnalysisError(ValueError):
    """Bad user input (unknown sweep, metric, baseline, empty selection): one line that names
    what was asked for and what exists. The CLI prints it and exits with code 2."""


def logical_metric_name(name: str) -> str:
    """Either spelling -> the logical name: `val/loss:batch` and `val/loss@batch` ->
    `val/loss@batch`. MLflow forbids '@' in keys, so the store spells it ':'."""
    return name.replace(":", "@")


def stored_metric_key(name: str) -> str:
    """Either spelling -> the key MLflow stores: `val/loss@batch` -> `val/loss:batch`."""
    return name.replace("@", ":")


def higher_is_better(metric: str) -> bool:
    return logical_metric_name(metric) in HIGHER_IS_BETTER
