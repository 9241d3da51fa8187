"""Tracking URIs: what `tracking.uri` means, whether a server answers, and a client to open it.

    uri = resolve_tracking_uri("runs/mlflow.db", workdir)  # -> sqlite:////abs/runs/mlflow.db
    check_server(uri)                                       # one line if an http(s) server is down
    client = tracking_client(uri)                           # safe to open from many processes

Writers (bln-train, the sweep) and readers (analysis) parse URIs here only. Stdlib only at
import; mlflow comes with the first client.
"""

from __future__ import annotations

import re
from pathlib import Path

from bln_sweeps.tracking.contract import mask_credentials

try:
    import fcntl
except ImportError:  # not on Windows; only the SQLite first-open lock needs it
    fcntl = None

SERVER_SCHEMES = ("http://", "https://")
_DB_SCHEME = re.compile(r"^(postgresql|mysql)(\+\w+)?://")
# What a reader can open with SQL (SQLAlchemy's dialect names; `sqlite+driver:` included).
SQL_SCHEMES = re.compile(r"^(sqlite|postgresql|postgres|mysql|mssql)(\+\w+)?:")
_SQLITE_URI = re.compile(r"^sqlite(\+\w+)?:///")
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
    if uri.startswith(SERVER_SCHEMES) or _DB_SCHEME.match(uri):
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
    if not uri.startswith(SERVER_SCHEMES):
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
        f"tracking server {mask_credentials(uri)} is unreachable: "
        f"it does not answer /health within {timeout_s:g} s ({reason})"
    )


def _sqlite_file(path: str, workdir: Path, uri: str) -> Path:
    p = Path(path).expanduser()
    p = p if p.is_absolute() else workdir / p
    if p.is_dir():
        raise ValueError(
            f"tracking.uri={uri!r} is a directory; give the SQLite file, e.g. {p / 'mlflow.db'}"
        )
    return p


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI, else None."""
    path = uri[len("sqlite:///") :].split("?", 1)[0] if uri.startswith("sqlite:///") else ""
    return Path(path).resolve() if path and path != ":memory:" else None


def sqlite_database(uri: str) -> str | None:
    """The path text of a sqlite[+driver]:///<path> URI (query string dropped), "" when it names
    none, None when `uri` is not such a URI. Readers check it exists (see analysis.load)."""
    base = uri.split("?", 1)[0]
    rest = _SQLITE_URI.sub("", base, count=1)
    return None if rest == base else rest


_opened: set[str] = set()  # SQLite stores this process has opened (their schema is in place)


def tracking_client(uri: str):
    """An MlflowClient for `uri` that is safe to open from several processes at once.

    The first open of a new SQLite store creates and migrates its schema, and MLflow 3.17 does
    that without a lock: 8 processes opening a fresh mlflow.db together failed with alembic
    errors and, once in three tries, left the file permanently unusable. A lock file next to the
    database serialises that first open (local disks; SQLite does not belong on NFS anyway).
    """
    from mlflow.tracking import MlflowClient

    db = sqlite_path(uri)
    if db is None or uri in _opened or fcntl is None:
        return MlflowClient(tracking_uri=uri)
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        client = MlflowClient(tracking_uri=uri)  # opens the store: creates/migrates tables
    _opened.add(uri)
    return client
