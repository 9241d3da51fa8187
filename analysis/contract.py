"""What analysis adds to the MLflow contract: the types of the tag columns, the grid axes, the
headline metrics, and the error type for bad user input.

The names runs are written with (tags, their values, metric spelling) have one owner,
bln_sweeps.tracking.contract, which is stdlib only: analysis imports them from there and still
imports nothing of the training stack.
"""

from __future__ import annotations

from bln_sweeps.tracking.contract import (
    AT_EDGE_TAG,
    BATCH_MODE,
    CELL_TAG,
    DEVICE_TAG,
    KIND_TAG,
    LEAKY_TAG,
    MFU,
    N_DEVICES_TAG,
    STATUS_REASON_TAG,
    STATUS_TAG,
    SWEEP_TAG,
    TEST_LOSS,
    TOKENS_PER_S,
    TRIAL_TAG,
    VAL_LOSS,
    logical_metric_name,
    loss_metric,
)

# Tags that become plain columns of the runs frame, with their types; every other tag becomes
# `tags.<key>`. MLflow's own `mlflow.parentRunId` becomes `parent_run_id`.
TAG_COLUMNS = {
    KIND_TAG: "str",
    STATUS_TAG: "str",
    STATUS_REASON_TAG: "str",
    SWEEP_TAG: "str",
    CELL_TAG: "str",
    TRIAL_TAG: "Int64",
    LEAKY_TAG: "boolean",
    DEVICE_TAG: "str",
    N_DEVICES_TAG: "Int64",
    AT_EDGE_TAG: "str",
}

# The grid axes every table has (when the runs carry them), as dotted config paths.
NORM, BATCH, SEQ, SEED = "norm.name", "batch.size", "seq.len", "seed"
MAIN_AXES = (NORM, BATCH, SEQ)

HEADLINE_METRIC = VAL_LOSS  # validation loss with population statistics (model.eval())
TEST_METRIC = TEST_LOSS  # the held-out split a sweep's tables report (selection never reads it)
SPLITS = ("val", "test")  # val: selection (search, pruner); test: reporting
HOLM_FAMILIES = ("all", "regime")  # one family for the whole table, or one per batch/seq regime
BATCH_STATS_METRIC = loss_metric("val", BATCH_MODE)  # train-mode forward: current-batch statistics
HIGHER_IS_BETTER = (TOKENS_PER_S, MFU)


class AnalysisError(ValueError):
    """Bad user input (unknown sweep, metric, baseline, empty selection): one line that names
    what was asked for and what exists. The CLI prints it and exits with code 2."""


def higher_is_better(metric: str) -> bool:
    return logical_metric_name(metric) in HIGHER_IS_BETTER
