"""Trials that lose their worker or their machine are retried, never spent.

A running trial's worker stamps it every HEARTBEAT_S seconds (`Heartbeat`); any worker that
finds a RUNNING trial with an old stamp (or a dead pid on its own host) fails it as retried and
queues the same params, seed and run directory again (`reap_dead_trials`). A trial that failed
because of the machine rather than its config (a full disk, a backend that stopped answering) is
queued again the same way, up to INFRA_RETRIES times (`retry_after_infrastructure_error`).
"""

from pathlib import Path

from bln_sweeps.sweep import optuna_internals
from bln_sweeps.sweep.stop import STOP_POLL_S, relay_stop, stop_requested

HEARTBEAT_S = 10.0  # a running trial's worker stamps the trial this often
GRACE_S = 60.0  # a RUNNING trial whose stamp is older than this lost its worker
INFRA_RETRIES = 3  # a trial failed by the machine, not by its config, is tried this often more


def _worker_gone(t, now: float, host: str, grace_s: float) -> bool:
    """No heartbeat for grace_s, or (on this host) its worker's pid is gone."""
    import os

    attrs = t.user_attrs
    # a trial resumed after preemption keeps its old stamp: its new start is the later one
    stamp = max(t.system_attrs.get("heartbeat", 0.0), t.datetime_start.timestamp())
    dead = now - stamp > grace_s
    if attrs.get("host") == host and attrs.get("pid"):
        try:
            os.kill(attrs["pid"], 0)
        except ProcessLookupError:
            dead = True
        except PermissionError:
            pass
    return dead


def reap_dead_trials(study, grace_s: float = GRACE_S) -> int:
    """Fail RUNNING trials whose worker is gone and queue a retry with the same parameters and
    the same run directory, so the retry resumes from the dead trial's last checkpoint."""
    import socket
    import time

    from optuna.trial import TrialState

    now, host, reaped = time.time(), socket.gethostname(), 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not _worker_gone(t, now, host, grace_s):
            continue
        try:
            reason = {"retried": True, "status_reason": "worker died"}
            optuna_internals.fail_stale(study, t, reason)
        except Exception:  # another worker reaped it first
            continue
        attrs = t.user_attrs
        study.enqueue_trial(
            t.params,
            user_attrs={
                "retry_of": t.number,
                "run_dir": attrs.get("run_dir"),
                "seed": attrs.get("seed"),
            },
        )
        reaped += 1
    return reaped


class Heartbeat:
    """Stamps a running trial every HEARTBEAT_S seconds from a daemon thread, and relays
    `bln-sweep stop` (the sweep's STOP file) to the trainer as the signal it checkpoints on."""

    def __init__(self, study, trial_id: int, sweep_dir: Path | None = None):
        import threading

        self.study, self.trial_id, self.sweep_dir = study, trial_id, sweep_dir
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        import time

        stamped = 0.0
        while not self.stop.wait(STOP_POLL_S):
            if self.sweep_dir is not None and stop_requested(self.sweep_dir):
                relay_stop()
            if time.time() - stamped < HEARTBEAT_S:
                continue
            stamped = time.time()
            try:
                optuna_internals.stamp(self.study, self.trial_id, "heartbeat", time.time())
            except Exception:
                return  # the trial finished (or was reaped): nothing left to stamp

    def __enter__(self) -> "Heartbeat":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()


def infrastructure_error(error: BaseException) -> bool:
    """True for failures of the machine rather than of the trial's config: a full or failing disk,
    a tracking or storage backend that stopped answering. Such a trial is retried, not spent."""
    if isinstance(error, OSError):  # ENOSPC, EIO, connection refused or reset, timeouts
        return True
    package = type(error).__module__.split(".")[0]
    if package in ("sqlalchemy", "psycopg", "psycopg2", "requests", "urllib3"):
        return True
    # MLflow's client reports a backend it cannot reach as INTERNAL_ERROR or
    # TEMPORARILY_UNAVAILABLE; bad values and missing runs have their own codes.
    code = getattr(error, "error_code", None)
    return package == "mlflow" and code in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE")


def retry_after_infrastructure_error(study, trial, run_dir: str, seed, error) -> bool:
    """Fail `trial` as retried and queue it again with the same params, seed and run directory
    (so the retry resumes from its checkpoint in its MLflow run). False when `error` is not an
    infrastructure error or the trial has been retried INFRA_RETRIES times already."""
    from optuna.trial import TrialState

    from bln_sweeps.credentials import mask_text

    attempt = trial.user_attrs.get("infra_attempt", 0) + 1
    if not infrastructure_error(error) or attempt > INFRA_RETRIES:
        return False
    reason = mask_text(f"{type(error).__name__}: {error}")[:500]
    trial.set_user_attr("retried", True)
    trial.set_user_attr("status_reason", f"retried: {reason}")
    study.tell(trial, state=TrialState.FAIL)
    study.enqueue_trial(
        trial.params,
        user_attrs={
            "retry_of": trial.number,
            "run_dir": run_dir,
            "seed": seed,
            "infra_attempt": attempt,
        },
    )
    return True
