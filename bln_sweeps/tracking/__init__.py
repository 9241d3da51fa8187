"""Tracking: how a run is written to MLflow and read back.

    contract     the one owner of metric, param, tag and status names (import names from here)
    uri          what `tracking.uri` means, the server check, the SQLite lock, the client
    provenance   git/env/version tags
    logger       RunLogger (batched, non-blocking), NullRunLogger, ends_runs_on_error
    outbox       RunLogger's background sender
    runs         reading runs back; ending the ones left RUNNING

Stdlib only at import (login-node tools and analysis import it); mlflow comes with the first run.
The names below are the package's public API; contract names are imported from `contract`.
"""

from bln_sweeps.tracking.logger import NullRunLogger, RunLogger, ends_runs_on_error
from bln_sweeps.tracking.outbox import Retry
from bln_sweeps.tracking.provenance import is_secret_name, provenance_tags
from bln_sweeps.tracking.runs import find_runs
from bln_sweeps.tracking.uri import check_server, resolve_tracking_uri, tracking_client

__all__ = [
    "NullRunLogger",
    "Retry",
    "RunLogger",
    "check_server",
    "ends_runs_on_error",
    "find_runs",
    "is_secret_name",
    "provenance_tags",
    "resolve_tracking_uri",
    "tracking_client",
]
