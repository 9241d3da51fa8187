"""Case 2: the `bln-sweep` driver dies, then the same command runs again.

Local workers are submitit LocalExecutor jobs: a controller process per worker, started by the
driver with SIGHUP ignored and stdio on /dev/null (launchers.submit.detached). What that means,
checked here on real processes:

- `kill -9` of the driver alone: its workers live on and keep pulling trials;
- a hangup of the driver's terminal (an SSH disconnect: SIGHUP to its whole process group): the
  driver dies, its workers live on.

The rerun of the same command submits new workers next to the survivors; the budget lives in the
studies, so nothing is trained twice, no trial is lost, and the ranked table is the one of an
undisturbed sweep.
"""

import os
import signal
import subprocess
import sys

import pytest

from tests.faults.conftest import (
    SWEEP,
    alive,
    all_trials,
    assert_sweep_intact,
    bln_sweep,
    pids_with,
    quiet_env,
    ranked,
    stop_leftovers,
    wait_for,
)


def start_driver(args, cwd, log):
    """The driver as a user starts it in a terminal: its own session and process group."""
    return subprocess.Popen(
        [sys.executable, "-m", "launchers", *args],
        cwd=cwd,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=quiet_env(),
        start_new_session=True,
    )


def mid_sweep(sweep_dir) -> bool:
    """A trial has finished and another is running: the driver is following busy workers."""
    states = {t.state.name for t in all_trials(sweep_dir)}
    return {"COMPLETE", "RUNNING"} <= states


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill -9 driver", "hangup session"])
def test_dead_driver_then_the_same_command_completes_the_sweep(how, tmp_path, reference):
    name = "driver-" + how.split()[0]
    args = [*SWEEP, f"sweep.name={name}", "launcher.workers=2"]
    sweep_dir = tmp_path / "sweeps" / name
    try:
        with open(tmp_path / "driver.log", "w") as log:
            driver = start_driver(args, tmp_path, log)
            wait_for(lambda: mid_sweep(sweep_dir) or driver.poll() is not None, "mid-sweep")
            assert driver.poll() is None, "the sweep ended before it could be interrupted"
            workers = pids_with(str(sweep_dir / "jobs"))  # submitit controllers and workers
            assert workers, "no worker processes found"
            if how == "kill -9 driver":
                driver.kill()
            else:
                os.killpg(driver.pid, signal.SIGHUP)
            driver.wait(60)
        assert all(alive(p) for p in workers)  # the workers outlive their driver
        assert [t for t in all_trials(sweep_dir) if t.state.name == "RUNNING"]

        p = bln_sweep(*args, cwd=tmp_path)  # the same command again
        assert p.returncode == 0, p.stdout + p.stderr
        # the first driver's workers stop once every budget is spent
        wait_for(lambda: not pids_with(str(sweep_dir)), "every worker to exit")
    finally:
        stop_leftovers(str(sweep_dir))

    facts = assert_sweep_intact(sweep_dir)
    finished = [t for c in facts["cells"].values() for t in c["search"] + c["confirm"]]
    assert not [t for t in finished if t.user_attrs.get("retry_of") is not None]  # none ran twice
    assert ranked(sweep_dir) == reference


@pytest.mark.slow
def test_driver_killed_while_preparing_leaves_no_run_running(tmp_path):
    """kill -9 at the one moment no outside timing can hit reliably: right before the driver
    writes the manifest, after it created the sweep's and the cells' MLflow runs."""
    args = [
        "norm=layernorm",
        "sweep.grid={batch: b4}",
        "sweep.name=prep",
        "search.n_trials=1",
        "search.confirm_seeds=0",
        "launcher=debug",
        *SWEEP[3:],
    ]
    die = (
        "import os, sys, launchers.cli as c, launchers.prepare as p\n"
        "p.write_manifest = lambda *a: os.kill(os.getpid(), 9)\n"
        "sys.argv = ['bln-sweep', *sys.argv[1:]]\n"
        "c.main()\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", die, *args], cwd=tmp_path, env=quiet_env(), capture_output=True
    )
    assert p.returncode == -signal.SIGKILL
    p = bln_sweep(*args, cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert_sweep_intact(tmp_path / "sweeps" / "prep", n_trials=1, confirm_seeds=0)
