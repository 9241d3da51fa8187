"""The MLflow contract: metric and param names, tracking URIs, provenance, and one run's logger.

    logger = RunLogger.start(uri, "bln-train", run_name="bln · b16 · s2048",
                             params=flatten_config(asdict(cfg)), tags=provenance_tags())
    logger.log_metrics({"train/loss": 3.2, "val/loss@batch": 3.4}, step=100)   # returns at once
    logger.end("FINISHED")                                                     # flushes first

Login-node tools import this module, so it imports neither torch nor (until a run starts)
mlflow. A run talks to MLflow through `MlflowClient` with explicit run ids, never the fluent
active-run API: that is process-global state and breaks with several runs or threads.
Metrics go through a background thread that batches them and, when the backend is down, keeps
them and retries for a bounded time, so a tracking outage never stops or crashes training.
"""

from __future__ import annotations

import atexit
import contextlib
import getpass
import json
import logging
import math
import os
import platform
import posixpath
import re
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # not on Windows; only the SQLite first-open lock needs it
    fcntl = None

log = logging.getLogger(__name__)


class _MaskingFilter(logging.Filter):
    """This module's warnings quote backend errors, which may quote a URL: mask its password."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = mask_credentials(record.getMessage()), None
        return True


log.addFilter(_MaskingFilter())

# MLflow's own limits (mlflow/utils/validation.py, 3.17): per log_batch call, and per value.
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_PARAM_VAL_LENGTH = 6000
MAX_KEY_LENGTH = 250

STATUSES = ("FINISHED", "FAILED", "KILLED")
LOST_METRICS_TAG = "tracking.lost_metrics"

# ---------------------------------------------------------------------------------------------
# Names

# MLflow accepts these characters in metric, param and tag keys (its regex, non-Windows), ':'
# included; metric names swap ':' for '@'.
_KEY_CHARS = r"/\w.\- "
_ALLOWED = "letters, digits, '_', '-', '.', '/', ' '"


def _check_key(kind: str, name: str, extra: str = ":") -> None:
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
    if isinstance(name, str) and ":" in name:
        raise ValueError(
            f"metric name {name!r} contains ':', which is reserved (it stores '@'); "
            "write an inference mode as 'val/loss@<mode>'"
        )
    _check_key("metric", name, extra="@")
    return name.replace("@", ":")


def logical_metric_name(key: str) -> str:
    """Stored MLflow metric key -> logical name: `val/loss:batch` -> `val/loss@batch`."""
    return key.replace(":", "@")


# ---------------------------------------------------------------------------------------------
# Params


def mask_credentials(text: str) -> str:
    """`scheme://user:password@host` -> `scheme://user:***@host`, for every URL in `text`: what
    may be logged of it (bln_sweeps.credentials parses URLs as SQLAlchemy does)."""
    from bln_sweeps.credentials import mask_text

    return mask_text(text)


def _param_value(value: Any) -> str:
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
            flat[path] = _param_value(value)
    return flat


# ---------------------------------------------------------------------------------------------
# Tracking URIs

_SERVER_SCHEMES = ("http://", "https://")
_DB_SCHEME = re.compile(r"^(postgresql|mysql)(\+\w+)?://")
_ACCEPTED_URIS = (
    "null (sqlite:///<cwd>/mlflow.db), sqlite:///<path>, a bare file path, http(s)://host:port, "
    "postgresql://... or mysql://..."
)


def resolve_tracking_uri(uri: str | None, workdir: Path) -> str:
    """`tracking.uri` -> an MLflow tracking URI, with every SQLite path made absolute.

    Relative SQLite paths are resolved against `workdir` now, not against whatever directory a
    worker process happens to run in later.
    """
    uri = (uri or "").strip()
    workdir = Path(workdir).expanduser().resolve()
    if not uri:
        return f"sqlite:///{workdir / 'mlflow.db'}"
    if uri.startswith("file:"):
        raise ValueError(
            f"tracking.uri={uri!r}: MLflow 3.13+ refuses the file store (./mlruns); use "
            f"sqlite:///<path>/mlflow.db (`mlflow migrate-filestore` converts old runs). "
            f"Accepted: {_ACCEPTED_URIS}"
        )
    if uri.startswith(_SERVER_SCHEMES) or _DB_SCHEME.match(uri):
        return uri
    if uri.startswith("sqlite:///"):
        rest = uri[len("sqlite:///") :]
        if rest.startswith("/") or rest == ":memory:":
            return uri
        return f"sqlite:///{_sqlite_file(rest, workdir, uri)}"
    if ":" in uri.split("/", 1)[0]:  # some other scheme, e.g. ftp:// or sqlite://host
        raise ValueError(f"tracking.uri={uri!r} is not supported. Accepted: {_ACCEPTED_URIS}")
    return f"sqlite:///{_sqlite_file(uri, workdir, uri)}"


SERVER_TIMEOUT_S = 5.0  # a tracking server that does not answer /health in this long is down


def check_server(uri: str, timeout_s: float = SERVER_TIMEOUT_S) -> None:
    """Raise ValueError (one line) unless the MLflow server at an http(s) `uri` answers /health
    within `timeout_s`: MlflowClient itself retries an unreachable server for minutes. Other
    URIs are not servers and pass."""
    if not uri.startswith(_SERVER_SCHEMES):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s):
            return
    except urllib.error.HTTPError as e:
        reason = f"HTTP {e.code} from /health"
    except Exception as e:  # refused, timed out, or not a URL urllib can open at all
        reason = str(getattr(e, "reason", e)) or type(e).__name__
    raise ValueError(
        f"tracking server {mask_credentials(uri)} does not answer within {timeout_s:g} s: {reason}"
    )


def _sqlite_file(path: str, workdir: Path, uri: str) -> Path:
    p = Path(path).expanduser()
    p = p if p.is_absolute() else workdir / p
    if p.is_dir():
        raise ValueError(
            f"tracking.uri={uri!r} is a directory; give the SQLite file, e.g. {p / 'mlflow.db'}"
        )
    return p


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI, else None."""
    path = uri[len("sqlite:///") :].split("?", 1)[0] if uri.startswith("sqlite:///") else ""
    return Path(path).resolve() if path and path != ":memory:" else None


_opened: set[str] = set()  # SQLite stores this process has opened (their schema is in place)


def tracking_client(uri: str):
    """An MlflowClient for `uri` that is safe to open from several processes at once.

    The first open of a new SQLite store creates and migrates its schema, and MLflow 3.17 does
    that without a lock: 8 processes opening a fresh mlflow.db together failed with alembic
    errors and, once in three tries, left the file permanently unusable. A lock file next to the
    database serialises that first open (local disks; SQLite does not belong on NFS anyway).
    """
    from mlflow.tracking import MlflowClient

    db = _sqlite_path(uri)
    if db is None or uri in _opened or fcntl is None:
        return MlflowClient(tracking_uri=uri)
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        client = MlflowClient(tracking_uri=uri)  # opens the store: creates/migrates tables
    _opened.add(uri)
    return client


# ---------------------------------------------------------------------------------------------
# Provenance

# Environment variables whose names contain these are never read into tags.
SECRET_MARKERS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL")

_ENV_TAGS = {
    "SLURM_JOB_ID": "slurm.job_id",
    "SLURM_ARRAY_JOB_ID": "slurm.array_job_id",
    "SLURM_ARRAY_TASK_ID": "slurm.array_task_id",
    "SLURM_RESTART_COUNT": "slurm.restart_count",
    "CUDA_VISIBLE_DEVICES": "cuda_visible_devices",
}
_VERSIONED = ("torch", "mlflow", "optuna", "hydra-core", "numpy", "bln-sweeps")


def is_secret_name(name: str) -> bool:
    """True if an environment variable's name suggests a credential (case-insensitive)."""
    upper = name.upper()
    return any(marker in upper for marker in SECRET_MARKERS)


def _env(name: str) -> str | None:
    """The one place this module reads the environment: secrets are never returned."""
    return None if is_secret_name(name) else os.environ.get(name)


def _git(*args: str) -> str | None:
    # Run in the package's own checkout (not the cwd): the tag describes the code that runs.
    # GIT_DIR & co. would point git elsewhere, e.g. inside a hook.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    try:
        p = subprocess.run(
            ["git", *args],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            env=env,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


@lru_cache(maxsize=1)  # the code in memory does not change while the process runs
def _git_tags() -> dict[str, str]:
    # A sweep job runs a snapshot of the code taken at submit (launchers/snapshot.py), which
    # records the SHA of the checkout it came from.
    snapshot = Path(__file__).resolve().parents[1]
    version = snapshot / "CODE_VERSION.json"
    if version.exists():
        facts = json.loads(version.read_text())
        return {
            "git.sha": facts.get("git.sha", "unknown"),
            "git.dirty": facts.get("git.dirty", "unknown"),
            "code.snapshot": str(snapshot),
        }
    # A package installed into a venv that sits inside some checkout is not that checkout's
    # code: require the package's own files to be tracked.
    if not _git("ls-files", "--error-unmatch", "__init__.py"):
        return {"git.sha": "unknown", "git.dirty": "unknown"}
    sha = _git("rev-parse", "HEAD") or "unknown"
    status = _git("status", "--porcelain", "--untracked-files=no")
    dirty = "unknown" if status is None else str(bool(status)).lower()
    return {"git.sha": sha, "git.dirty": dirty}


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)  # reads package metadata; imports nothing
    except metadata.PackageNotFoundError:
        return "not installed"


def provenance_tags(extra: Mapping | None = None) -> dict[str, str]:
    """Where and with what a run ran: git SHA + dirty flag, host, versions, SLURM ids, GPUs."""
    tags = {
        **_git_tags(),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        **{f"version.{dist}": _version(dist) for dist in _VERSIONED},
    }
    for var, tag in _ENV_TAGS.items():
        value = _env(var)
        if value is not None:
            tags[tag] = value
    tags.update({str(k): str(v) for k, v in (extra or {}).items()})
    return tags


# ---------------------------------------------------------------------------------------------
# One run


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


def _now_ms() -> int:
    return int(time.time() * 1000)


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class _Outbox:
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


class RunLogger:
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
        self._queue = _Outbox()  # filled by the caller's thread, drained by the sender
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
        client: Any = None,
        retry: Retry | None = None,
        send_interval_s: float = 1.0,
    ) -> RunLogger:
        """Create a run (or resume `run_id`, setting it RUNNING again) and log params and tags.

        This call is synchronous and raises if the backend refuses it: better to fail before
        training starts than to train for hours untracked. `client` replaces MlflowClient(uri)
        (tests inject failing backends through it).
        """
        client = tracking_client(uri) if client is None else client
        system: dict[str, str] = {}
        if parent_run_id:
            system["mlflow.parentRunId"] = parent_run_id  # how MLflow nests runs
        if description:
            system["mlflow.note.content"] = mask_credentials(description)  # the run's page
        tags = {**{str(k): mask_credentials(str(v)) for k, v in (tags or {}).items()}, **system}
        params = {str(k): _param_value(v) for k, v in (params or {}).items()}
        for k in tags:
            _check_key("tag", k)
        for k in params:
            _check_key("param", k)

        if run_id:
            run = _resume(client, run_id, uri)
        else:
            run = client.create_run(
                _experiment_id(client, experiment, uri),
                tags={"mlflow.user": _user(), "mlflow.source.name": sys.argv[0], **system},
                run_name=run_name,
            )
        run_id, experiment_id = run.info.run_id, run.info.experiment_id
        try:
            _log_now(client, run_id, params=params, tags=tags)
        except BaseException:
            with contextlib.suppress(Exception):  # do not leave a half-made run RUNNING
                client.set_terminated(run_id, "FAILED")
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
        ts, step = _now_ms(), int(step)
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
            _check_key("tag", k)
        self._enqueue(lambda q: q.tags.update(tags))

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Queue params (MLflow params are write-once: a different value for a key is dropped)."""
        params = {str(k): _param_value(v) for k, v in params.items()}
        for k in params:
            _check_key("param", k)
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

    def end(self, status: str = "FINISHED", timeout: float | None = None) -> None:
        """Flush, then mark the run `status`. Idempotent; never raises for backend trouble.

        With the backend down this waits up to the retry budget (plus one in-flight request);
        `timeout` bounds the wait, leaving the sender to finish in the background.
        """
        if status not in STATUSES:
            raise ValueError(f"run status {status!r} is not one of {', '.join(STATUSES)}")
        with self._cond:
            if self._ended:
                return
            self._queue.end = (status, _now_ms())
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
        self.end("FINISHED" if exc_type is None else "FAILED")

    # -- the sender thread ----------------------------------------------------------------------

    def _send_loop(self) -> None:
        out = _Outbox()
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

    def _take(self, out: _Outbox) -> None:
        """Move the queue into `out` (lock held): everything queued so far travels together."""
        q = self._queue
        out.params.update(q.params)
        out.tags.update(q.tags)
        out.metrics.extend(q.metrics)
        out.end = q.end or out.end
        self._queue = _Outbox()
        self._taken = self._queued

    def _deliver(self, out: _Outbox) -> None:
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

    def _send_next(self, out: _Outbox) -> None:
        """Send the first chunk of `out` and remove it; raises on failure, leaving `out` as is."""
        kind, chunk = out.next_chunk()
        if kind == "params":
            _log_now(self._client, self.run_id, params=dict(chunk))
        elif kind == "tags":
            _log_now(self._client, self.run_id, tags=dict(chunk))
        elif kind == "metrics":
            from mlflow.entities import Metric

            metrics = [Metric(k, v, ts, step) for k, v, ts, step in chunk]
            self._client.log_batch(self.run_id, metrics=metrics, synchronous=True)
        else:
            if self.lost_metrics:
                _log_now(self._client, self.run_id, tags={LOST_METRICS_TAG: str(self.lost_metrics)})
            status, end_time = out.end
            self._client.set_terminated(self.run_id, status, end_time)
        out.remove(kind, chunk)

    def _drop_next(self, out: _Outbox, error: Exception) -> None:
        kind, chunk = out.next_chunk()
        out.remove(kind, chunk)
        if kind == "metrics":
            self.lost_metrics += len(chunk)
        log.warning("run %s: MLflow rejected %d %s: %s", self.run_id, len(chunk), kind, error)

    def _give_up(self, out: _Outbox, error: Exception) -> None:
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
                    logger.set_tags({"status": "failed", "status_reason": reason})
                    logger.end("FAILED")
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

    def end(self, status: str = "FINISHED", timeout: float | None = None) -> None:
        if status not in STATUSES:
            raise ValueError(f"run status {status!r} is not one of {', '.join(STATUSES)}")

    def __enter__(self) -> NullRunLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        pass


def _log_now(client: Any, run_id: str, params=None, tags=None) -> None:
    """Synchronous log_batch of params and tags, within MLflow's per-call limits."""
    from mlflow.entities import Param, RunTag

    for chunk in _chunks(list((params or {}).items()), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=[Param(k, v) for k, v in chunk], synchronous=True)
    for chunk in _chunks(list((tags or {}).items()), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in chunk], synchronous=True)


def _experiment_id(client: Any, name: str, uri: str) -> str:
    """Get or create the experiment; several workers may try to create it at the same moment."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        db = _sqlite_path(uri)
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


def _resume(client: Any, run_id: str, uri: str):
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise ValueError(f"run_id={run_id!r} to resume is not in the tracking store {uri}") from e
    if run.info.lifecycle_stage != "active":
        raise ValueError(f"run_id={run_id!r} to resume is deleted in {uri}")
    client.update_run(run_id, status="RUNNING")
    return run


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


# ---------------------------------------------------------------------------------------------
# Reading back


def find_runs(uri: str, experiment: str, filter_string: str = "", order_by=None) -> list:
    """Every run of `experiment` matching `filter_string` (all pages: MlflowClient.search_runs
    alone stops at 1000 runs without a warning)."""
    client = tracking_client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ValueError(f"experiment {experiment!r} not in {uri}; there are: {', '.join(names)}")
    runs, token = [], None
    while True:
        page = client.search_runs(
            [exp.experiment_id],
            filter_string,
            max_results=1000,
            order_by=order_by,
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs
