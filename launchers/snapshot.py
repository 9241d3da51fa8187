"""Frozen code: a sweep's jobs run a copy of the code taken when the driver submitted them.

Jobs can wait hours in a SLURM queue; edits made to the checkout meanwhile must not leak into
them (a half-edited model.py would silently change half a sweep). At submit time the driver
copies the import packages and the config tree to `<sweep dir>/code/<stamp>/` with a
`CODE_VERSION.json` (git SHA and dirty flag of the checkout it came from), and every job starts
with `job_env()`: the snapshot first on PYTHONPATH and PYTHONSAFEPATH=1, so neither the job's
working directory (which `python -m` would put first on sys.path) nor an editable install can
shadow it. `bln_sweeps.tracking` tags every run with the snapshot's SHA.

Torch-free: runs on the login node.
"""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from bln_sweeps.tracking.contract import GIT_DIRTY_TAG, GIT_SHA_TAG

PACKAGES = ("bln_sweeps", "launchers", "analysis", "hydra_plugins", "conf")
VERSION_FILE = "CODE_VERSION.json"


def source_root() -> Path:
    """The directory holding the import packages and `conf/` this process runs."""
    import bln_sweeps

    return Path(bln_sweeps.__file__).resolve().parents[1]


def git_version(root: Path) -> dict[str, str]:
    """SHA and dirty flag of the checkout at `root` ("unknown" outside a git checkout)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}

    def git(*args: str) -> str | None:
        try:
            p = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, env=env
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return p.stdout.strip() if p.returncode == 0 else None

    if git("ls-files", "--error-unmatch", "bln_sweeps/__init__.py") is None:
        return {GIT_SHA_TAG: "unknown", GIT_DIRTY_TAG: "unknown"}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        GIT_SHA_TAG: git("rev-parse", "HEAD") or "unknown",
        GIT_DIRTY_TAG: "unknown" if status is None else str(bool(status)).lower(),
    }


def take(sweep_dir: Path) -> Path:
    """Copy the code into `<sweep_dir>/code/<stamp>/` and return that directory.

    A new snapshot per submission: jobs still queued from an earlier submission keep theirs."""
    root = source_root()
    stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
    dest = Path(sweep_dir).resolve() / "code" / stamp
    tmp = dest.with_name(f".{stamp}.tmp")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in PACKAGES:
        if (root / name).is_dir():
            shutil.copytree(root / name, tmp / name, ignore=ignore)
    version = {**git_version(root), "source": str(root), "taken": time.time()}
    (tmp / VERSION_FILE).write_text(json.dumps(version, indent=2))
    os.replace(tmp, dest)  # a snapshot directory is complete or absent
    return dest


def job_env(snapshot: Path) -> dict[str, str]:
    """Environment variables that make a job import `snapshot` (set them in the job)."""
    path = os.environ.get("PYTHONPATH")
    return {
        "PYTHONPATH": str(snapshot) + (os.pathsep + path if path else ""),
        "PYTHONSAFEPATH": "1",  # `python -m` must not put the job's cwd ahead of the snapshot
    }
