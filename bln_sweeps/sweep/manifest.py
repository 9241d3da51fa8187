"""`<sweep dir>/manifest.json`: what the sweep driver (launchers.prepare) tells its workers.

The one definition of the file both sides read and write: the sweep name, the storage and
tracking URIs, the command's overrides and seed, the search and launcher settings, every cell
(its overrides, search space and MLflow run id) and the worker jobs submitted so far.

    manifest = load_manifest(sweep_dir)      # real URLs put back from credentials.json
    manifest.cells[0].name, manifest.search["n_trials"]
    write_manifest(sweep_dir, manifest)      # atomic: a temp file, then os.replace

Versioned: the file carries `version`; a file without one is version 1 (the format before it had
a number is the same). A version this code does not know, or a key its reader requires missing,
is a ManifestError (a ValueError) naming the file and the key, not a KeyError deep in a worker.

URL passwords never reach the file: `write_manifest` masks them and keeps the real URLs in
`credentials.json` (mode 0600) beside it (bln_sweeps.credentials). Torch-free.
"""

import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

VERSION = 1
MANIFEST_FILE = "manifest.json"


class ManifestError(ValueError):
    """A manifest this code cannot read: damaged, of an unknown version, or missing a key."""


class _ByKey:
    """Read access by key (`manifest["sweep"]`, `cell.get("space")`) with the semantics of the
    plain dict the manifest was before it had a type: a key the file did not hold is a KeyError
    (or `get`'s default), though the attribute has its default. Scripts, tests and the
    `bln-analyze` and `ui` readers index it that way."""

    _present: frozenset[str] | None = None  # the keys the file held; None: built in code, all

    def __getitem__(self, key: str) -> Any:
        if key not in self:
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str) or key not in {f.name for f in fields(self)}:
            return False
        return self._present is None or key in self._present

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default


@dataclass
class Cell(_ByKey):
    """One grid point: its overrides, its search space (`dotted.key -> expression`) and the MLflow
    run its trials nest under."""

    name: str
    overrides: list[str]
    space: dict[str, Any] = field(default_factory=dict)
    mlflow_run_id: str | None = None


@dataclass
class Job(_ByKey):
    """One submitted worker job (launchers.queue reattaches to the SLURM ones still queued)."""

    job_id: str
    launcher: str
    worker: int
    submitted: float


@dataclass
class Manifest(_ByKey):
    """Every key has a default so that readers needing a few keys (`bln-analyze` only the
    tracking URI) read small manifests as before; `load_manifest(..., require=...)` names the keys
    a reader cannot do without, and a file missing one is a ManifestError."""

    sweep: str = ""
    base_overrides: list[str] = field(default_factory=list)
    tracking_uri: str = ""
    storage_url: str | None = None
    search: dict[str, Any] = field(default_factory=dict)
    cells: list[Cell] = field(default_factory=list)
    base_seed: int = 0
    launcher: dict[str, Any] = field(default_factory=dict)
    command: str = ""
    mlflow_run_id: str | None = None  # the sweep's own MLflow run, parent of the cells' runs
    jobs: list[Job] = field(default_factory=list)
    version: int = VERSION

    @property
    def parent_run_ids(self) -> list[str | None]:
        """The cells' MLflow runs, then the sweep's own (None where there is none)."""
        return [c.mlflow_run_id for c in self.cells] + [self.mlflow_run_id]

    def to_json(self) -> dict[str, Any]:
        """The file's JSON object: `version` first, then the fields in the order they always had."""
        data = asdict(self)
        order = ["version", "sweep", "command", "base_overrides", "base_seed", "cells", "search"]
        order += ["launcher", "storage_url", "tracking_uri", "mlflow_run_id", "jobs"]
        return {k: data[k] for k in order}

    @classmethod
    def from_json(cls, data: Any, where: str = MANIFEST_FILE) -> "Manifest":
        if not isinstance(data, dict):
            raise ManifestError(f"{where}: not a sweep manifest (a JSON object)")
        version = data.get("version", 1)  # unnumbered files are the version-1 format
        if version != VERSION:
            raise ManifestError(
                f"{where}: manifest version {version!r}; this bln_sweeps reads version {VERSION}"
            )
        typed = {**data, "version": version}
        for key, item in (("cells", Cell), ("jobs", Job)):
            if key in data:
                typed[key] = [
                    _build(item, x, f"{where}: {key}[{i}]") for i, x in _items(data, key, where)
                ]
        manifest = _build(cls, typed, where)
        manifest._present = frozenset(k for k in data if k in typed)  # "version" only if held
        return manifest


def _items(data: dict, key: str, where: str):
    if not isinstance(data[key], list):
        raise ManifestError(f"{where}: {key!r} is not a list")
    return enumerate(data[key])


def _build(cls, data: Any, where: str):
    """`cls(**data)` with a clear error for a missing required key; unknown keys are ignored (a
    newer writer may add one an older reader does not need)."""
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: not a JSON object")
    known = {f.name: f for f in fields(cls)}
    for name, f in known.items():
        if f.default is MISSING and f.default_factory is MISSING and name not in data:
            raise ManifestError(f"{where}: missing key {name!r}")
    built = cls(**{k: v for k, v in data.items() if k in known})
    built._present = frozenset(k for k in data if k in known)
    return built


# What a worker (and the edge report) reads; what `bln-sweep status` and the live view read.
WORKER_KEYS = ("sweep", "base_overrides", "tracking_uri", "storage_url", "search", "cells")
VIEW_KEYS = ("sweep", "storage_url", "search", "cells")


def load_manifest(sweep_dir: Path, require: tuple[str, ...] = ()) -> Manifest:
    """The sweep's manifest with its real storage and tracking URLs (the file itself holds masked
    ones; bln_sweeps.credentials). A key of `require` the file lacks is a ManifestError."""
    from bln_sweeps.credentials import with_private

    path = Path(sweep_dir) / MANIFEST_FILE
    data = json.loads(path.read_text())
    if isinstance(data, dict):
        data = with_private(data, sweep_dir)
    manifest = Manifest.from_json(data, str(path))
    for key in require:
        if key not in manifest:
            raise ManifestError(f"{path}: missing key {key!r}")
    return manifest


def write_manifest(sweep_dir: Path, manifest: Manifest) -> None:
    """The manifest with URL passwords masked; the real URLs, when masking changed any, go to
    `credentials.json` (mode 0600) beside it, written first (bln_sweeps.credentials). Atomic: a
    reader sees the old file or the new one, never half of one."""
    from bln_sweeps.credentials import PRIVATE_FILE, split_private, write_private

    public, private = split_private(manifest.to_json())
    if private:
        write_private(Path(sweep_dir) / PRIVATE_FILE, private)
    tmp = Path(sweep_dir) / f".{MANIFEST_FILE}.tmp"
    tmp.write_text(json.dumps(public, indent=2))
    os.replace(tmp, Path(sweep_dir) / MANIFEST_FILE)
