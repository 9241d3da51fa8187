"""The MLflow contract, the one owner of every name a run is written and read back by: metric keys
and their spelling, param keys and values, tag names and tag values, run statuses.

    metric_key("val/loss@batch")               # -> "val/loss:batch" (what MLflow stores)
    flatten_config({"optim": {"lr": 3e-4}})    # -> {"optim.lr": "0.0003"}
    {KIND_TAG: CONFIRM, STATUS_TAG: PRUNED}    # a confirm run that was pruned

The trainer, the sweep worker, the launcher and analysis all import these names from here, so a
tag value or a metric spelling exists once. Stdlib only: analysis and login-node tools import it.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

# MLflow's own limits (mlflow/utils/validation.py, 3.17): per log_batch call, and per value.
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_PARAM_VAL_LENGTH = 6000
MAX_KEY_LENGTH = 250

# ---------------------------------------------------------------------------------------------
# Run statuses: MLflow's own (attributes.status), and the ones a run may be ended with.
RUN_RUNNING, RUN_FINISHED, RUN_FAILED, RUN_KILLED = "RUNNING", "FINISHED", "FAILED", "KILLED"
STATUSES = (RUN_FINISHED, RUN_FAILED, RUN_KILLED)

# ---------------------------------------------------------------------------------------------
# Tags: names, then the values of `kind` and `status`.
KIND_TAG = "kind"  # what a run is: one of KINDS
STATUS_TAG = "status"  # how a training run ended (or RUNNING while it runs): one of RUN_STATES
STATUS_REASON_TAG = "status_reason"  # one line saying why, for pruned/diverged/failed/preempted
SWEEP_TAG = "sweep"  # the sweep's name (= its experiment)
CELL_TAG = "cell"  # the grid cell a trial or confirm run belongs to
TRIAL_TAG = "trial"  # the Optuna trial number
AT_EDGE_TAG = "at_edge"  # confirm runs: searched keys whose best value is at an edge of the range
LEAKY_TAG = "leaky"  # "true"/"false": whether the norm leaks across positions (bln_sweeps.leak)
DEVICE_TAG = "device"
N_DEVICES_TAG = "n_devices"
OPTUNA_STUDY_TAG = "optuna.study"  # the study a trial or confirm run belongs to
LOST_METRICS_TAG = "tracking.lost_metrics"  # metric points the logger gave up on
GIT_SHA_TAG, GIT_DIRTY_TAG = "git.sha", "git.dirty"  # the code a run ran (provenance, snapshot)
RUN_DIR_TAG = "run_dir"  # where the run's checkpoint lives; set when the run is created
# MLflow's own tags
PARENT_TAG = "mlflow.parentRunId"  # how MLflow nests runs
RUN_NAME_TAG = "mlflow.runName"
NOTE_TAG = "mlflow.note.content"  # the run page's description
USER_TAG = "mlflow.user"
SOURCE_NAME_TAG = "mlflow.source.name"

# Tag `kind`. Sweep and cell runs are parents; confirm runs (the best config of a cell re-run
# with several seeds) are the seed replicates the tables rank; plain bln-train runs are single.
SWEEP, CELL, TRIAL, CONFIRM, SINGLE = "sweep", "cell", "trial", "confirm", "single"
KINDS = (SWEEP, CELL, TRIAL, CONFIRM, SINGLE)
TRAINING_KINDS = (TRIAL, CONFIRM, SINGLE)  # runs that trained a model (not parent runs)

# Tag `status`: how a training run ended. Anything else (e.g. RUNNING) counts as running.
RUNNING, FINISHED, PRUNED, DIVERGED, FAILED, PREEMPTED = (
    "running",
    "finished",
    "pruned",
    "diverged",
    "failed",
    "preempted",
)
RUN_STATES = (RUNNING, FINISHED, PRUNED, DIVERGED, FAILED, PREEMPTED)

# ---------------------------------------------------------------------------------------------
# Metric names, in their logical spelling.

# A metric's inference mode: logical names say `val/loss@batch`, MLflow forbids '@' in keys and
# ':' is the closest character it allows, so the store says `val/loss:batch`.
_MODE, _STORED_MODE = "@", ":"
# `<split>/loss` is a split's loss in eval mode (population statistics); `<split>/loss@<mode>`
# the same split under another inference mode (bln_sweeps.evaluate).
TRAIN_LOSS, TRAIN_LR, TRAIN_GRAD_NORM = "train/loss", "train/lr", "train/grad_norm"
VAL_LOSS, TEST_LOSS = "val/loss", "test/loss"
BATCH_MODE = "batch"  # `@batch`: the train-mode forward, current-batch statistics
TOKENS_PER_S, MFU, WALL_S = "perf/tokens_per_s", "perf/mfu", "perf/wall_s"


def loss_metric(split: str, mode: str | None = None) -> str:
    """`loss_metric("val")` -> `val/loss`; `loss_metric("val", "batch")` -> `val/loss@batch`."""
    return f"{split}/loss" + (f"{_MODE}{mode}" if mode else "")


def split_metric(name: str) -> tuple[str, str | None]:
    """Logical name -> (name without its mode, mode or None): `val/loss@batch` -> ("val/loss",
    "batch"), `val/loss` -> ("val/loss", None)."""
    base, sep, mode = name.partition(_MODE)
    return base, (mode if sep else None)


# ---------------------------------------------------------------------------------------------
# Metric and param keys

# MLflow accepts these characters in metric, param and tag keys (its regex, non-Windows), ':'
# included; metric names swap ':' for '@'.
_KEY_CHARS = r"/\w.\- "
_ALLOWED = "letters, digits, '_', '-', '.', '/', ' '"


def check_key(kind: str, name: str, extra: str = ":") -> None:
    """Raise ValueError unless MLflow would store `name` (with `extra` allowed) unchanged."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{kind} name {name!r} must be a non-empty string")
    if len(name) > MAX_KEY_LENGTH:
        raise ValueError(f"{kind} name {name[:40]!r}... is longer than {MAX_KEY_LENGTH} characters")
    allowed = re.compile(f"[{_KEY_CHARS}{re.escape(extra)}]")
    bad = next((c for c in name if not allowed.fullmatch(c)), None)
    if bad is not None:
        raise ValueError(
            f"{kind} name {name!r} contains {bad!r}, which MLflow does not accept; "
            f"allowed: {_ALLOWED}, {extra!r}"
        )
    # MLflow also uses names as file paths in places and rejects ones that normalise to another.
    if posixpath.normpath(name) != name or name.startswith(("/", "..")) or name == ".":
        raise ValueError(
            f"{kind} name {name!r} is not a clean path (no leading '/' or '..', no '//', "
            "'/./' or trailing '/')"
        )


@lru_cache(maxsize=4096)  # called for every metric on the training hot path
def metric_key(name: str) -> str:
    """Logical metric name -> stored MLflow key: `val/loss@batch` -> `val/loss:batch`.

    MLflow forbids '@', and ':' is the closest character it allows. ':' is therefore reserved in
    logical names, so that `logical_metric_name` inverts this exactly.
    """
    if isinstance(name, str) and _STORED_MODE in name:
        raise ValueError(
            f"metric name {name!r} contains ':', which is reserved (it stores '@'); "
            "write an inference mode as 'val/loss@<mode>'"
        )
    check_key("metric", name, extra=_MODE)
    return stored_metric_key(name)


def stored_metric_key(name: str) -> str:
    """Either spelling -> the key MLflow stores, unchecked (for reading): `val/loss@batch` and
    `val/loss:batch` -> `val/loss:batch`."""
    return name.replace(_MODE, _STORED_MODE)


def logical_metric_name(key: str) -> str:
    """Either spelling -> the logical name: `val/loss:batch` -> `val/loss@batch`."""
    return key.replace(_STORED_MODE, _MODE)


def mask_credentials(text: str) -> str:
    """`scheme://user:password@host` -> `scheme://user:***@host`, for every URL in `text`: what
    may be logged of it (bln_sweeps.credentials parses URLs as SQLAlchemy does)."""
    from bln_sweeps.credentials import mask_text

    return mask_text(text)


def param_value(value: Any) -> str:
    """A value as MLflow stores a param (it calls str()), with lists as JSON, cut to its limit.

    Credentials in URLs are masked: the whole resolved config is logged, storage URIs included.
    """
    if isinstance(value, (list, tuple, dict)):
        text = json.dumps(value, default=str)
    else:
        text = str(value)  # None -> "None", True -> "True", 3e-4 -> "0.0003"
    text = mask_credentials(text)
    if len(text) > MAX_PARAM_VAL_LENGTH:
        marker = f"...<truncated: {len(text)} chars>"
        text = text[: MAX_PARAM_VAL_LENGTH - len(marker)] + marker
    return text


def flatten_config(d: Mapping, prefix: str = "") -> dict[str, str]:
    """Nested config -> MLflow params with dotted keys (`norm.options.zeta`), values as strings.

    The dotted keys are the Hydra override paths, so a table column, an MLflow filter
    (`params."optim.lr"`) and a command-line override all say the same thing. An empty section
    is kept as "{}" so that its key still exists.
    """
    flat: dict[str, str] = {}
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, prefix=f"{path}."))
        elif isinstance(value, Mapping):
            flat[path] = "{}"
        else:
            flat[path] = param_value(value)
    return flat
