"""CI fails on what it skips: `ci-services.sh` fails when a service cannot be brought up, and
under CI=true a test that would skip (a missing service, an importorskip, a skipif) fails.

The service failures are produced with the script's own settings (a port nothing listens on, a
cluster start script that fails, browser paths that do not exist), never by stopping the shared
services of this machine.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launchers" / "scripts" / "ci-services.sh"


def test_the_ci_command_is_the_readmes_test_command():
    readme = (ROOT / "README.md").read_text()
    command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert command.startswith("python3 -m venv") and "ci-services.sh &&" in command
    assert f"```bash\n{command}\n```" in readme


def test_ci_services_fails_naming_each_service_that_cannot_come_up(tmp_path):
    failing = tmp_path / "slurm-up.sh"
    failing.write_text("#!/bin/sh\necho '[slurm-up] error: slurmctld did not start' >&2\nexit 1\n")
    failing.chmod(0o755)
    env = {
        **os.environ,
        "SLURM_UP": str(failing),
        "SLURM_DIR": str(tmp_path / "slurm"),
        "BLN_PG_PORT": "1",  # nothing listens there, and no cluster of this machine starts there
        "CHROMIUM": str(tmp_path / "no-chromium"),
        "CHROMEDRIVER": str(tmp_path / "no-chromedriver"),
        "CI_SERVICES_INSTALL": "0",
    }
    p = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 1, p.stdout + p.stderr
    down = [line for line in p.stdout.splitlines() if "NOT UP:" in line]
    assert [d.split("NOT UP: ")[1].split(":")[0] for d in down] == [
        "chromium",
        "PostgreSQL",
        "SLURM",
    ], p.stdout
    assert "slurmctld did not start" in p.stdout


SKIPPING = """
import pytest

def test_needs_a_missing_service(postgres_url):
    pass

def test_skips_itself():
    pytest.skip("no such thing here")

def test_runs():
    pass
"""


def run_pytest(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "test_skipping.py").write_text(SKIPPING)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["BLN_PG_ADMIN"] = "postgresql://postgres@127.0.0.1:1/postgres"  # no server there
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider"]
        + ["--rootdir", str(tmp_path), str(tmp_path / "test_skipping.py")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )


def test_under_ci_a_skip_is_a_failure_and_the_summary_shows_none(tmp_path):
    p = run_pytest(tmp_path, "true")
    summary = p.stdout.strip().splitlines()[-1]
    assert p.returncode == 1, p.stdout
    # the fixture fails in setup (an error), the test that skips itself fails
    assert "1 failed, 1 passed, 1 error" in summary and "skipped" not in summary, summary
    assert "no PostgreSQL at" in p.stdout and "CI=true" in p.stdout


def test_outside_ci_a_missing_service_skips(tmp_path):
    p = run_pytest(tmp_path, None)
    summary = p.stdout.strip().splitlines()[-1]
    assert p.returncode == 0 and "1 passed, 2 skipped" in summary, p.stdout
