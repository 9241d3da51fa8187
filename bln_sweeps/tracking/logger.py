"""One MLflow run's logger: batched and non-blocking, so a tracking outage never stops or
crashes training.

    logger = RunLogger.start(uri, "bln-train", run_name="bln · b16 · s2048",
                             params=flatten_config(asdict(cfg)), tags=provenance_tags())
    logger.log_metrics({"train/loss": 3.2, "val/loss@batch": 3.4}, step=100)   # returns at once
    logger.end("FINISHED")                                                     # flushes first

A run talks to MLflow through `MlflowClient` with explicit run ids, never the fluent active-run
API: that is process-global state and breaks with several runs or threads. Metrics go through a
background thread (bln_sweeps.tracking.outbox) that batches them and, when the backend is down,
keeps them and retries for a bounded time. Login-node tools import this module, so it imports
neither torch nor (until a run starts) mlflow.
"""

from __future__ import annotations

import atexit
import contextlib
import getpass
import re
import sys
import threading
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from bln_sweeps.tracking.contract import (
    FAILED,
    LOST_METRICS_TAG,
    NOTE_TAG,
    PARENT_TAG,
    RUN_FAILED,
    RUN_FINISHED,
    SOURCE_NAME_TAG,
    STATUS_REASON_TAG,
    STATUS_TAG,
    STATUSES,
    USER_TAG,
    check_key,
    mask_credentials,
    metric_key,
    param_value,
)
from bln_sweeps.tracking.outbox import Outbox, Retry, Sender, log, log_now, now_ms
from bln_sweeps.tracking.runs import resume_run
from bln_sweeps.tracking.uri import sqlite_path, tracking_client


class RunLogger(Sender):
    """One MLflow run. Metric logging is non-blocking; a background thread delivers batches.

    Use `RunLogger.start(...)`; the constructor attaches to a run that already exists.
    """

    def __init__(
        self,
        client: Any,
        run_id: str,
        experiment_id: str,
        *,
        retry: Retry | None = None,
        send_interval_s: float = 1.0,
    ) -> None:
        self.run_id: str | None = run_id
        self.experiment_id: str | None = experiment_id
        self.lost_metrics = 0  # metric points given up on (backend down longer than the budget)
        self._client = client
        self._retry = retry or Retry()
        # Coalesce for up to this long: one write per second per worker instead of one per step
        # keeps a shared SQLite file or a busy server out of lock contention.
        self._send_interval_s = send_interval_s
        self._cond = threading.Condition()
        self._queue = Outbox()  # filled by the caller's thread, drained by the sender
        self._queued = 0  # calls queued so far
        self._taken = 0  # calls the sender has taken
        self._settled = 0  # calls delivered or given up on
        self._flush_now = False
        self._ended = False
        self._warned_after_end = False
        self._thread: threading.Thread | None = None  # started by the first queued call

    # -- creating -----------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        uri: str,
        experiment: str,
        run_name: str | None = None,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        parent_run_id: str | None = None,
        run_id: str | None = None,
        description: str | None = None,
        *,
        on_created: Callable[[str], None] | None = None,
        client: Any = None,
        retry: Retry | None = None,
        send_interval_s: float = 1.0,
    ) -> RunLogger:
        """Create a run (or resume `run_id`, setting it RUNNING again) and log params and tags.

        This call is synchronous and raises if the backend refuses it: better to fail before
        training starts than to train for hours untracked. A new run gets its tags in the same
        write that creates it, so whoever finds it knows whose it is, and `on_created(run_id)`
        is called before anything else is logged (the trainer notes the id beside its checkpoint
        there). `client` replaces MlflowClient(uri) (tests inject failing backends through it).
        """
        client = tracking_client(uri) if client is None else client
        system: dict[str, str] = {}
        if parent_run_id:
            system[PARENT_TAG] = parent_run_id  # how MLflow nests runs
        if description:
            system[NOTE_TAG] = mask_credentials(description)  # the run's page
        tags = {**{str(k): mask_credentials(str(v)) for k, v in (tags or {}).items()}, **system}
        params = {str(k): param_value(v) for k, v in (params or {}).items()}
        for k in tags:
            check_key("tag", k)
        for k in params:
            check_key("param", k)

        if run_id:
            run = resume_run(client, run_id, uri)
        else:
            run = client.create_run(
                _experiment_id(client, experiment, uri),
                tags={USER_TAG: _user(), SOURCE_NAME_TAG: sys.argv[0], **tags},
                run_name=run_name,
            )
            tags = {}  # written with the run
        run_id, experiment_id = run.info.run_id, run.info.experiment_id
        try:
            if on_created is not None:
                on_created(run_id)
            log_now(client, run_id, params=params, tags=tags)
        except BaseException:
            with contextlib.suppress(Exception):  # do not leave a half-made run RUNNING
                client.set_terminated(run_id, RUN_FAILED)
            raise
        logger = cls(client, run_id, experiment_id, retry=retry, send_interval_s=send_interval_s)
        for started in getattr(_open_runs, "stack", [])[-1:]:  # inside ends_runs_on_error
            started.append(logger)
        return logger

    @staticmethod
    def disabled() -> NullRunLogger:
        """A logger that does nothing (`tracking.enabled=false`); its run_id is None."""
        return NullRunLogger()

    # -- logging (non-blocking) -----------------------------------------------------------------

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue metrics under their logical names (`val/loss@batch`) and return at once.

        nan and ±inf are accepted: MLflow keeps nan, and stores ±inf as ±1.797e308.
        """
        ts, step = now_ms(), int(step)
        points = []
        for name, value in metrics.items():
            key = metric_key(name)
            try:
                points.append((key, float(value), ts, step))
            except (TypeError, ValueError):
                raise ValueError(f"metric {name!r} has value {value!r}, not a number") from None
        self._enqueue(lambda q: q.metrics.extend(points))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Queue tags (values as strings, URL passwords masked); later values for a key win."""
        tags = {str(k): mask_credentials(str(v)) for k, v in tags.items()}
        for k in tags:
            check_key("tag", k)
        self._enqueue(lambda q: q.tags.update(tags))

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Queue params (MLflow params are write-once: a different value for a key is dropped)."""
        params = {str(k): param_value(v) for k, v in params.items()}
        for k in params:
            check_key("param", k)
        self._enqueue(lambda q: q.params.update(params))

    def _enqueue(self, add) -> None:
        with self._cond:
            if self._ended:
                if not self._warned_after_end:
                    log.warning("run %s: logging after end() is ignored", self.run_id)
                    self._warned_after_end = True
                return
            add(self._queue)
            self._queued += 1
            self._start_sender()
            self._cond.notify_all()

    def _start_sender(self) -> None:
        # Lazily: a parent run that is created and left open never needs a thread.
        if self._thread is None:
            name = f"mlflow-run-{self.run_id[:8]}"
            self._thread = threading.Thread(target=self._send_loop, name=name, daemon=True)
            self._thread.start()
            _LIVE.add(self)

    # -- artifacts (synchronous; failures are logged, not raised) --------------------------------

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> bool:
        return self._artifact(self._client.log_artifact, self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> bool:
        return self._artifact(self._client.log_text, self.run_id, text, artifact_file)

    def log_dict(self, dictionary: Mapping, artifact_file: str) -> bool:
        """JSON or YAML by the file's extension (`config.yaml`), as MlflowClient.log_dict does."""
        return self._artifact(self._client.log_dict, self.run_id, dict(dictionary), artifact_file)

    def _artifact(self, fn, *args) -> bool:
        try:
            fn(*args)
            return True
        except Exception as e:  # an artifact is not worth a crashed run
            log.warning("run %s: artifact not logged: %s: %s", self.run_id, type(e).__name__, e)
            return False

    # -- flushing and ending --------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Block until everything queued so far is delivered (or given up on); False on timeout."""
        with self._cond:
            target = self._queued
            if self._settled >= target:
                return True
            self._flush_now = True
            self._cond.notify_all()
            return self._cond.wait_for(lambda: self._settled >= target, timeout)

    def end(self, status: str = RUN_FINISHED, timeout: float | None = None) -> None:
        """Flush, then mark the run `status`. Idempotent; never raises for backend trouble.

        With the backend down this waits up to the retry budget (plus one in-flight request);
        `timeout` bounds the wait, leaving the sender to finish in the background.
        """
        if status not in STATUSES:
            raise ValueError(f"run status {status!r} is not one of {', '.join(STATUSES)}")
        with self._cond:
            if self._ended:
                return
            self._queue.end = (status, now_ms())
            self._queued += 1
            self._ended = True
            self._start_sender()
            self._cond.notify_all()
        self._thread.join(timeout)
        _LIVE.discard(self)
        if self._thread.is_alive():
            log.warning(
                "run %s: tracking backend still failing after %ss; the run may stay RUNNING "
                "and metrics queued since then may be lost",
                self.run_id,
                timeout,
            )
        elif self.lost_metrics:
            log.warning(
                "run %s: %d metric points could not be delivered (tag %s)",
                self.run_id,
                self.lost_metrics,
                LOST_METRICS_TAG,
            )

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end(RUN_FINISHED if exc_type is None else RUN_FAILED)

    # The sender thread's methods (_send_loop and what it calls) are inherited from Sender.


_open_runs = threading.local()  # RunLoggers started inside `ends_runs_on_error`, per thread


def ends_runs_on_error(fn):
    """Decorate a function that starts MLflow runs: whatever exception leaves it (a full disk at
    the last checkpoint, an unwritable directory, a bug, Ctrl-C), every run it started and left
    open is ended FAILED with `status=failed` and the reason, never left RUNNING."""
    import functools

    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        stack = _open_runs.__dict__.setdefault("stack", [])
        stack.append([])
        try:
            return fn(*args, **kwargs)
        except BaseException as e:
            reason = f"{type(e).__name__}: {e}"[:500]
            for logger in stack[-1]:
                if not logger._ended:
                    logger.set_tags({STATUS_TAG: FAILED, STATUS_REASON_TAG: reason})
                    logger.end(RUN_FAILED)
            raise
        finally:
            stack.pop()

    return guarded


class NullRunLogger:
    """RunLogger's interface doing nothing: `tracking.enabled=false`, and the overhead baseline."""

    run_id = None
    experiment_id = None
    lost_metrics = 0

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> bool:
        return False

    def log_text(self, text: str, artifact_file: str) -> bool:
        return False

    def log_dict(self, dictionary: Mapping, artifact_file: str) -> bool:
        return False

    def flush(self, timeout: float | None = None) -> bool:
        return True

    def end(self, status: str = RUN_FINISHED, timeout: float | None = None) -> None:
        if status not in STATUSES:
            raise ValueError(f"run status {status!r} is not one of {', '.join(STATUSES)}")

    def __enter__(self) -> NullRunLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        pass


def _experiment_id(client: Any, name: str, uri: str) -> str:
    """Get or create the experiment; several workers may try to create it at the same moment."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        db = sqlite_path(uri)
        # Keep an embedded store's artifacts next to its database, not in the cwd's ./mlruns.
        safe = re.sub(r"[^\w.-]+", "_", name)
        location = str(db.parent / "mlartifacts" / safe) if db else None
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        exp = client.get_experiment_by_name(name)  # another process won the race
    if exp.lifecycle_stage != "active":
        raise ValueError(
            f"tracking.experiment={name!r} is deleted in {uri}; restore it "
            f"(`mlflow experiments restore --experiment-id {exp.experiment_id}`) or pick a new name"
        )
    return exp.experiment_id


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # containers without a passwd entry
        return "unknown"


# Loggers not yet ended get their queues flushed at interpreter exit (their sender threads are
# daemons, which Python would otherwise stop mid-batch).
_LIVE: weakref.WeakSet[RunLogger] = weakref.WeakSet()


@atexit.register
def _flush_live_loggers() -> None:
    for logger in list(_LIVE):
        logger.flush(timeout=logger._retry.budget_s)
