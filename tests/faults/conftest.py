"""The fault-injection suite: one sweep shape, process probes, and the undisturbed reference.

Every sweep case checks the same things (`assert_sweep_intact`): exactly the requested number of
finished trials in every cell, no trial number twice (in Optuna or in MLflow), no MLflow run left
RUNNING, and, where the process is deterministic, the ranked table of `bln-analyze` equal to the
one of an undisturbed sweep (`reference`). The sweeps are deterministic because nothing is really
searched (`optim.lr` is a one-value choice): every trial of a cell and every confirm seed trains
the same way whichever worker runs it, and CPU training is bitwise reproducible, resumed or not.
"""

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.test_sweep import FAST, assert_complete, sweep_facts

# 2 cells x (2 trials + 2 confirm seeds), 12 steps of the tiny model each
SWEEP = [
    "norm=layernorm,rmsnorm",
    "search.n_trials=2",
    "search.confirm_seeds=2",
    "search.pruner=none",
    "search.params={optim.lr:'choice(1e-3)'}",
    *FAST,
]
N_TRIALS, CONFIRM_SEEDS = 2, 2

# table columns that the results do not decide: the machine's speed, and which of a cell's
# identical trials Optuna names best (the first to finish)
VOLATILE = {"cpu_hours", "gpu_hours", "tokens_per_s", "best_trial"}


def quiet_env(**extra: str) -> dict[str, str]:
    """This environment, one thread per process (2 shared cores; also the same arithmetic in
    every process), and no tracking or storage settings leaking in from the caller's shell."""
    leaks = ("MLFLOW_TRACKING_URI", "BLN_OPTUNA_URL", "HYDRA_FULL_ERROR")
    env = {k: v for k, v in os.environ.items() if k not in leaks}
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra})
    return env


def cli(module: str, *args: str, cwd: Path, timeout: float = 900, env=None, **kw):
    """`python -m <module> args...` (bln_sweeps.cli, launchers, analysis) as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or quiet_env(),
        **kw,
    )


def bln_sweep(*args: str, cwd: Path, **kw):
    return cli("launchers", *args, cwd=cwd, **kw)


# ---- processes ---------------------------------------------------------------------------------


def process_state(pid: int) -> str | None:
    """The kernel's one-letter state of `pid` (R, S, D, Z, ...), None when there is no such pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def alive(pid: int) -> bool:
    """Running or sleeping; a zombie is dead (PID 1 in some containers never reaps orphans)."""
    return process_state(pid) not in (None, "Z", "X")


def pids_with(text: str) -> list[int]:
    """Live processes whose command line contains `text` (a test's own tmp path: only its own)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and alive(int(proc.name)):
            found.append(int(proc.name))
    return found


def wait_for(condition, what: str, timeout: float = 600, poll_s: float = 0.3):
    """Poll `condition()` until it returns something truthy; fail naming `what` at the timeout
    (a generous bound against a hung test, not a measurement)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"gave up waiting for {what} after {timeout:.0f} s")


def stop_leftovers(text: str) -> None:
    """Kill, by pid, what a failed test left running of its own sweep (its tmp path)."""
    for pid in pids_with(text):
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


# ---- sweeps ------------------------------------------------------------------------------------


def all_trials(sweep_dir: Path) -> list:
    """Every trial of every study of a sweep (empty before the manifest exists)."""
    from bln_sweeps.sweep.manifest import load_manifest
    from bln_sweeps.sweep.space import open_storage

    if not (sweep_dir / "manifest.json").exists():
        return []
    m = load_manifest(sweep_dir)
    storage = open_storage(m["storage_url"], sweep_dir)
    return [
        t
        for study in storage.get_all_studies()
        for t in storage.get_all_trials(study._study_id, deepcopy=False)
    ]


def assert_sweep_intact(sweep_dir: Path, n_trials: int = N_TRIALS, confirm_seeds=CONFIRM_SEEDS):
    """Exactly `n_trials` finished trials in every cell and `confirm_seeds` confirm runs (an int,
    or {cell: int}), no trial number twice in Optuna or MLflow, no MLflow run RUNNING. Returns
    the sweep's facts (tests.test_sweep.sweep_facts)."""
    facts = sweep_facts(sweep_dir)
    for name, cell in facts["cells"].items():
        want = confirm_seeds[name] if isinstance(confirm_seeds, dict) else confirm_seeds
        assert_complete({"cells": {name: cell}, "runs": []}, n_trials, want)
    running = [r.info.run_name for r in facts["runs"] if r.info.status == "RUNNING"]
    assert not running, f"MLflow runs left RUNNING: {running}"
    runs = Counter(
        (r.data.tags.get("cell"), r.data.tags["kind"], r.data.tags.get("trial"))
        for r in facts["runs"]
        if r.data.tags.get("kind") in ("trial", "confirm")
    )
    assert not [k for k, n in runs.items() if n > 1], f"one trial, several MLflow runs: {runs}"
    return facts


def ranked(sweep_dir: Path) -> dict[str, dict]:
    """`bln-analyze <sweep> --format json`, rows by cell, less the VOLATILE columns."""
    from bln_sweeps.sweep.manifest import load_manifest

    m = load_manifest(sweep_dir)
    uri = m["tracking_uri"]
    p = cli("analysis", m["sweep"], "--tracking-uri", uri, "--format", "json", cwd=sweep_dir)
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)["rows"]
    return {row["cell"]: {k: v for k, v in row.items() if k not in VOLATILE} for row in rows}


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> dict[str, dict]:
    """The ranked table of the undisturbed sweep (SWEEP, 2 local workers)."""
    root = tmp_path_factory.mktemp("reference")
    p = bln_sweep(*SWEEP, "sweep.name=ref", "launcher.workers=2", cwd=root)
    assert p.returncode == 0, p.stdout + p.stderr
    sweep_dir = root / "sweeps" / "ref"
    assert_sweep_intact(sweep_dir)
    return ranked(sweep_dir)
