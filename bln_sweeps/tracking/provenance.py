"""Provenance tags: where and with what a run ran (git SHA and dirty flag, host, library
versions, SLURM ids, GPUs), so every run logs its own code version.

    tags = provenance_tags({"kind": "single"})

Reads the environment through one function that never returns a secret. Stdlib only.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
from collections.abc import Mapping
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from bln_sweeps.tracking.contract import GIT_DIRTY_TAG, GIT_SHA_TAG

# The bln_sweeps package directory (this module sits in bln_sweeps/tracking/), and the directory
# above it: a job's code snapshot, or the checkout.
_PACKAGE = Path(__file__).resolve().parents[1]
_SNAPSHOT = _PACKAGE.parent

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
            cwd=_PACKAGE,
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
    version = _SNAPSHOT / "CODE_VERSION.json"
    if version.exists():
        facts = json.loads(version.read_text())
        return {
            GIT_SHA_TAG: facts.get(GIT_SHA_TAG, "unknown"),
            GIT_DIRTY_TAG: facts.get(GIT_DIRTY_TAG, "unknown"),
            "code.snapshot": str(_SNAPSHOT),
        }
    # A package installed into a venv that sits inside some checkout is not that checkout's
    # code: require the package's own files to be tracked.
    if not _git("ls-files", "--error-unmatch", "__init__.py"):
        return {GIT_SHA_TAG: "unknown", GIT_DIRTY_TAG: "unknown"}
    sha = _git("rev-parse", "HEAD") or "unknown"
    status = _git("status", "--porcelain", "--untracked-files=no")
    dirty = "unknown" if status is None else str(bool(status)).lower()
    return {GIT_SHA_TAG: sha, GIT_DIRTY_TAG: dirty}


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
