"""RunLogger's background sender: the queue of one run's params, tags and metric points, and
the thread that delivers it to MLflow in batches, retrying through an outage for a bounded time.

`RunLogger` (bln_sweeps.tracking.logger) is the half callers see: it checks names and queues.
`Sender` is the half that drains the queue; RunLogger inherits it, and the two share the state
set up in RunLogger.__init__ (`_cond` guards everything below it there).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from bln_sweeps.tracking.contract import (
    LOST_METRICS_TAG,
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_TAGS_PER_BATCH,
    mask_credentials,
)

# One logger for the whole package, under the package's name (what callers configure).
log = logging.getLogger("bln_sweeps.tracking")


class _MaskingFilter(logging.Filter):
    """This package's warnings quote backend errors, which may quote a URL: mask its password."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = mask_credentials(record.getMessage()), None
        return True


log.addFilter(_MaskingFilter())


@dataclass(frozen=True)
class Retry:
    """How long the sender keeps trying through a backend outage before it drops data."""

    budget_s: float = 120.0  # one outage (time since the first failure); then drop, go on
    first_wait_s: float = 0.5  # backoff doubles from here ...
    max_wait_s: float = 15.0  # ... up to here


# Errors that another attempt cannot fix (bad value, deleted run): drop the chunk at once.
_PERMANENT_ERRORS = {
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_DOES_NOT_EXIST",
    "INVALID_STATE",
    "BAD_REQUEST",
}


def _is_permanent(error: Exception) -> bool:
    return getattr(error, "error_code", None) in _PERMANENT_ERRORS


def now_ms() -> int:
    return int(time.time() * 1000)


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class Outbox:
    """Params, tags, metric points and the end of a run, in the order they are sent."""

    def __init__(self) -> None:
        self.params: dict[str, str] = {}
        self.tags: dict[str, str] = {}
        self.metrics: list[tuple[str, float, int, int]] = []  # (key, value, timestamp ms, step)
        self.end: tuple[str, int] | None = None  # (status, end time ms)

    def __bool__(self) -> bool:
        return bool(self.params or self.tags or self.metrics or self.end)

    def next_chunk(self) -> tuple[str, list]:
        """What one MLflow call sends next, within its per-call limits."""
        if self.params:
            return "params", list(self.params.items())[:MAX_PARAMS_TAGS_PER_BATCH]
        if self.tags:
            return "tags", list(self.tags.items())[:MAX_PARAMS_TAGS_PER_BATCH]
        if self.metrics:
            return "metrics", self.metrics[:MAX_METRICS_PER_BATCH]
        return "end", [self.end]

    def remove(self, kind: str, chunk: list) -> None:
        if kind in ("params", "tags"):
            pending = getattr(self, kind)
            for k, v in chunk:
                if pending.get(k) == v:  # a newer value queued meanwhile still has to go
                    del pending[k]
        elif kind == "metrics":
            del self.metrics[: len(chunk)]
        else:
            self.end = None


def log_now(client: Any, run_id: str, params=None, tags=None) -> None:
    """Synchronous log_batch of params and tags, within MLflow's per-call limits."""
    from mlflow.entities import Param, RunTag

    for chunk in _chunks(list((params or {}).items()), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=[Param(k, v) for k, v in chunk], synchronous=True)
    for chunk in _chunks(list((tags or {}).items()), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in chunk], synchronous=True)


class Sender:
    """The sender thread's side of RunLogger (see the module docstring)."""

    def _send_loop(self) -> None:
        out = Outbox()
        last_send = -math.inf  # the first batch goes out at once
        while True:
            with self._cond:
                while not self._due(last_send):
                    self._cond.wait(self._wait_s(last_send))
                self._take(out)
                self._flush_now = False
            self._deliver(out)
            last_send = time.monotonic()
            with self._cond:
                self._settled = self._taken
                self._cond.notify_all()
                if self._ended and self._settled == self._queued:
                    return

    def _due(self, last_send: float) -> bool:
        q = self._queue
        if not q:
            return False
        interval_over = time.monotonic() - last_send >= self._send_interval_s
        return self._flush_now or q.end is not None or interval_over

    def _wait_s(self, last_send: float) -> float | None:
        if not self._queue:
            return None  # sleep until something is queued
        return max(0.0, self._send_interval_s - (time.monotonic() - last_send))

    def _take(self, out: Outbox) -> None:
        """Move the queue into `out` (lock held): everything queued so far travels together."""
        q = self._queue
        out.params.update(q.params)
        out.tags.update(q.tags)
        out.metrics.extend(q.metrics)
        out.end = q.end or out.end
        self._queue = Outbox()
        self._taken = self._queued

    def _deliver(self, out: Outbox) -> None:
        """Send `out` chunk by chunk; retry through an outage, drop what cannot be sent."""
        outage_since, wait = None, self._retry.first_wait_s
        while out:
            try:
                self._send_next(out)
                outage_since, wait = None, self._retry.first_wait_s
                continue
            except Exception as e:
                error = e
            if _is_permanent(error):
                self._drop_next(out, error)
                continue
            now = time.monotonic()
            if outage_since is None:
                outage_since = now
                log.warning(
                    "run %s: tracking backend failed (%s: %s); retrying for up to %.0f s",
                    self.run_id,
                    type(error).__name__,
                    error,
                    self._retry.budget_s,
                )
            if now - outage_since >= self._retry.budget_s:
                self._give_up(out, error)
                break
            time.sleep(min(wait, max(0.0, outage_since + self._retry.budget_s - now)))
            wait = min(2 * wait, self._retry.max_wait_s)
            with self._cond:  # whatever arrived meanwhile goes out with the retry
                self._take(out)

    def _send_next(self, out: Outbox) -> None:
        """Send the first chunk of `out` and remove it; raises on failure, leaving `out` as is."""
        kind, chunk = out.next_chunk()
        if kind == "params":
            log_now(self._client, self.run_id, params=dict(chunk))
        elif kind == "tags":
            log_now(self._client, self.run_id, tags=dict(chunk))
        elif kind == "metrics":
            from mlflow.entities import Metric

            metrics = [Metric(k, v, ts, step) for k, v, ts, step in chunk]
            self._client.log_batch(self.run_id, metrics=metrics, synchronous=True)
        else:
            if self.lost_metrics:
                log_now(self._client, self.run_id, tags={LOST_METRICS_TAG: str(self.lost_metrics)})
            status, end_time = out.end
            self._client.set_terminated(self.run_id, status, end_time)
        out.remove(kind, chunk)

    def _drop_next(self, out: Outbox, error: Exception) -> None:
        kind, chunk = out.next_chunk()
        out.remove(kind, chunk)
        if kind == "metrics":
            self.lost_metrics += len(chunk)
        log.warning("run %s: MLflow rejected %d %s: %s", self.run_id, len(chunk), kind, error)

    def _give_up(self, out: Outbox, error: Exception) -> None:
        """Drop what the outage held up, but still try once to end the run and say what was lost."""
        self.lost_metrics += len(out.metrics)
        log.warning(
            "run %s: tracking backend down for %.0f s (%s); dropping %d metric points, "
            "%d params, %d tags",
            self.run_id,
            self._retry.budget_s,
            error,
            len(out.metrics),
            len(out.params),
            len(out.tags),
        )
        out.params, out.tags, out.metrics = {}, {}, []
        if out.end:
            try:
                self._send_next(out)
            except Exception as e:
                out.end = None
                log.warning("run %s: could not end the run, it stays RUNNING: %s", self.run_id, e)
