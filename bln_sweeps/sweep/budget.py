"""How much of a sweep's budget is spent: per study (trials), and overall (device-hours).

Read by the worker to pick its next trial, and by the login-node views (`bln-sweep status`, the
live view, the report), so it stays torch-free.
"""

from collections.abc import Mapping
from typing import Any

BUDGET_ENDED = "budget_ended"  # the study note a worker leaves when search.budget_hours ended it


def counted(trial) -> bool:
    """Trials that spend budget: everything but surplus asks and failures that were retried."""
    attrs = trial.user_attrs
    return not attrs.get("surplus") and not attrs.get("retried")


def budget_state(study, budget: int) -> dict[str, int]:
    from optuna.trial import TrialState

    c = {"complete": 0, "pruned": 0, "failed": 0, "running": 0, "waiting": 0}
    names = {
        TrialState.COMPLETE: "complete",
        TrialState.PRUNED: "pruned",
        TrialState.FAIL: "failed",
        TrialState.RUNNING: "running",
        TrialState.WAITING: "waiting",
    }
    for t in study.get_trials(deepcopy=False):
        if counted(t):
            c[names[t.state]] += 1
    c["done"] = c["complete"] + c["pruned"] + c["failed"]
    c["left"] = budget - c["done"] - c["running"] - c["waiting"]
    return c


def search_budget(study, search: Mapping[str, Any]) -> int:
    """search.n_trials, plus search.expand_trials once an edge range was widened."""
    extra = search.get("expand_trials", 0) if study.user_attrs.get("expanded") else 0
    return search["n_trials"] + extra


def expansion_pending(study, search: Mapping[str, Any]) -> bool:
    """search.expand_edges is on and no worker has yet looked for edges in this study."""
    return bool(search.get("expand_edges")) and "expanded" not in study.user_attrs


def budget_ended(study) -> str | None:
    """The note a worker left on a search study when search.budget_hours ended it."""
    from bln_sweeps.sweep.optuna_internals import legacy_study_note

    return study.user_attrs.get(BUDGET_ENDED) or legacy_study_note(study, BUDGET_ENDED)


def end_budget(study, reason: str) -> None:
    """Leave the note `budget_ended` reads (once: the first worker to see the cap writes it)."""
    if not budget_ended(study):
        study.set_user_attr(BUDGET_ENDED, reason)


def compute_hours(studies, launcher: Mapping[str, Any], now: float | None = None) -> float:
    """Device-hours the sweep's runs took so far: each run's wall time (running ones up to now)
    x the devices a worker holds (its GPUs, or one CPU worker)."""
    import time

    from optuna.trial import TrialState

    now = time.time() if now is None else now
    seconds = 0.0
    for study in studies:
        for t in study.get_trials(deepcopy=False):
            if t.datetime_start is None or t.state == TrialState.WAITING:
                continue
            end = t.datetime_complete.timestamp() if t.datetime_complete else now
            seconds += max(end - t.datetime_start.timestamp(), 0.0)
    return seconds / 3600 * max(1, launcher.get("gpus_per_worker") or 0)
