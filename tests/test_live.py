"""What a researcher sees: the live view (terminal and log), `bln-sweep stop`, the help, the
cost estimate before submitting, and the compute budget."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_sweep import FAST, assert_complete, bln_sweep, sweep_facts

ROOT = Path(__file__).resolve().parents[1]


# ---- events, from a sweep's studies as workers leave them (no training) --------------------


def fake_sweep(tmp_path: Path, cells=("norm=layernorm", "norm=bln"), gpus: int = 0) -> Path:
    """A sweep directory with a manifest and empty studies in a journal file."""
    import optuna

    from bln_sweeps.sweep.space import open_storage, study_names

    sweep_dir = tmp_path / "sweeps" / "s"
    sweep_dir.mkdir(parents=True)
    manifest = {
        "sweep": "s",
        "storage_url": None,
        "cells": [{"name": c, "overrides": [c], "space": {}} for c in cells],
        "search": {"n_trials": 3, "confirm_seeds": 2, "metric": "val/loss"},
        "launcher": {"name": "local", "workers": 2, "gpus_per_worker": gpus},
    }
    (sweep_dir / "manifest.json").write_text(json.dumps(manifest))
    storage = open_storage(None, sweep_dir)
    for c in cells:
        for name in study_names("s", c):
            optuna.create_study(study_name=name, storage=storage)
    return sweep_dir


def study(sweep_dir: Path, name: str):
    import optuna

    from bln_sweeps.sweep.space import open_storage

    return optuna.load_study(study_name=name, storage=open_storage(None, sweep_dir))


def test_each_finished_pruned_failed_retried_or_preempted_run_is_one_event(tmp_path):
    from optuna.trial import TrialState

    from launchers.live import events, poll, summary

    sweep_dir = fake_sweep(tmp_path)
    ln, bln = study(sweep_dir, "s/norm=layernorm"), study(sweep_dir, "s/norm=bln")
    first = poll(sweep_dir)
    assert first.budget == 2 * (3 + 2) and first.done == 0

    done = ln.ask()
    ln.tell(done, 4.25)
    pruned = ln.ask()
    pruned.report(5.0, 8)
    ln.tell(pruned, state=TrialState.PRUNED)
    failed = bln.ask()
    bln._storage.set_trial_user_attr(failed._trial_id, "status_reason", "RuntimeError: boom")
    bln.tell(failed, state=TrialState.FAIL)
    dead = bln.ask()
    bln._storage.set_trial_user_attr(dead._trial_id, "retried", True)
    bln.tell(dead, state=TrialState.FAIL)
    surplus = bln.ask()
    bln._storage.set_trial_user_attr(surplus._trial_id, "surplus", True)
    bln.tell(surplus, state=TrialState.FAIL)
    preempted = bln.ask()
    bln._storage.set_trial_user_attr(preempted._trial_id, "preempted", 1)
    bln._storage.set_trial_user_attr(preempted._trial_id, "status_reason", "stopped by SIGUSR1")
    bln._storage.set_trial_state_values(preempted._trial_id, TrialState.WAITING)

    second = poll(sweep_dir)
    lines = events(first, second, "val/loss")
    words = sorted(line.split()[1] for line in lines)
    assert words == ["failed", "finished", "preempted", "pruned", "retried"], lines
    text = "\n".join(lines)
    assert "norm=layernorm  trial 0  val/loss 4.2500" in text
    assert "trial 1  at step 8" in text
    assert "RuntimeError: boom" in text and "back in the queue" in text
    assert events(second, poll(sweep_dir), "val/loss") == []  # nothing new, nothing said
    assert events(None, second, "val/loss") == []  # watching starts: no replay of the past
    # done: finished + pruned + failed; retried and surplus asks do not spend budget
    assert second.done == 3
    assert summary(second).startswith("3/10 runs · 0 running")


def test_summary_counts_rate_time_left_and_device_hours(tmp_path):
    import datetime as dt

    from launchers.live import poll, summary, timing

    sweep_dir = fake_sweep(tmp_path, cells=("norm=layernorm",), gpus=2)
    s = study(sweep_dir, "s/norm=layernorm")
    t0 = dt.datetime(2026, 1, 1, 12, 0, 0)
    for i in range(2):
        t = s.ask()
        s.tell(t, 4.0 - i)
    trials = s.get_trials(deepcopy=False)
    snap = poll(sweep_dir)
    # the first start set to a known time: the arithmetic is what is tested
    snap.started = t0.timestamp()
    now = (t0 + dt.timedelta(hours=1)).timestamp()
    snap.finished = False
    elapsed, rate, left = timing(snap, now)
    assert elapsed == 3600 and rate == pytest.approx(2.0)  # 2 runs in an hour
    assert snap.budget == 3 + 2 and left == pytest.approx(3 / 2 * 3600)
    assert "2/5 runs" in summary(snap, now) and "2 runs/h" in summary(snap, now)
    assert "left ~1:30:00" in summary(snap, now) and "GPU-hours" in summary(snap, now)
    assert len(trials) == 2


def test_compute_hours_is_run_wall_time_times_devices(tmp_path):
    from optuna.trial import TrialState

    from bln_sweeps.sweep.budget import compute_hours

    sweep_dir = fake_sweep(tmp_path, cells=("norm=layernorm",))
    s = study(sweep_dir, "s/norm=layernorm")
    finished = s.ask()
    s.tell(finished, 1.0)
    waiting = s.ask()  # a preempted trial back in the queue is not running: no time counted
    s._storage.set_trial_state_values(waiting._trial_id, TrialState.WAITING)
    t = s.get_trials(deepcopy=False)[0]
    run_s = (t.datetime_complete - t.datetime_start).total_seconds()
    for gpus, factor in ((0, 1), (1, 1), (4, 4)):
        got = compute_hours([s], {"gpus_per_worker": gpus})
        assert got == pytest.approx(run_s / 3600 * factor, rel=1e-3)


def test_stop_reaches_a_running_trainer_as_its_checkpoint_signal_and_never_kills(tmp_path):
    """`bln-sweep stop` writes STOP; the trial's heartbeat thread turns it into SIGUSR1 once the
    trainer's handler is installed (checkpoint, then Preempted), and never before: SIGUSR1's
    default action would kill the worker while it builds its model."""
    import signal

    import optuna

    from bln_sweeps.checkpoint import StopSignals
    from bln_sweeps.sweep.retries import Heartbeat
    from bln_sweeps.sweep.stop import STOP_FILE

    s = optuna.create_study()
    trial = s.ask()
    (tmp_path / STOP_FILE).write_text("now")
    with Heartbeat(s, trial._trial_id, tmp_path):
        time.sleep(2.5)  # two stop checks with no handler installed: this process survives
        with StopSignals() as signals:
            deadline = time.monotonic() + 60
            while signals.received is None and time.monotonic() < deadline:
                time.sleep(0.1)
    assert signals.received == signal.SIGUSR1


# ---- help ------------------------------------------------------------------------------------


def run_help(module: str, *args: str) -> str:
    p = subprocess.run(
        [sys.executable, "-m", module, *args, "--help"], capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_help_names_every_subcommand_the_readme_documents():
    readme = (ROOT / "README.md").read_text()
    # the first word after `bln-sweep` on a README command line: a subcommand or a flag
    words = set(re.findall(r"^(?:\$ )?bln-sweep ([a-z-]+)(?:\s|$)", readme, re.M)) - {"--help"}
    documented = {w for w in words if not w.startswith("+")}
    assert {"status", "ui", "stop", "calibrate", "--dry-run", "--detach"} <= documented
    text = run_help("launchers")
    for sub in documented:
        assert re.search(rf"bln-sweep {re.escape(sub)}\b", text), sub
    for override in ("search.n_trials", "search.budget_hours", "launcher=slurm", "+experiment="):
        assert override in text
    analyze = run_help("analysis")
    assert "--report" in analyze and "--plots" in analyze


def test_bln_train_help_shows_the_tool_before_hydras_lists():
    p = subprocess.run(
        [sys.executable, "-m", "bln_sweeps.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    head, _, groups = p.stdout.partition("== Configuration groups ==")
    assert head.startswith("bln-train: train, evaluate and log ONE GPT-2 run")
    for word in ("norm=bln batch=b16 seq=s2048", "optim.lr=", "bln-sweep --help", "bln-analyze"):
        assert word in head
    assert "norm: " in groups and "layernorm" in groups


# ---- cost before submitting ------------------------------------------------------------------


def test_flops_per_token_from_the_config_equals_the_models_count():
    pytest.importorskip("torch")
    from bln_sweeps.build import build_model
    from bln_sweeps.config import ModelConfig, RunConfig
    from launchers.cost import flops_per_token

    for cfg in (
        ModelConfig(),
        ModelConfig(n_layer=3, n_head=6, n_embd=96, vocab_size=1000),
        ModelConfig(n_layer=2, n_embd=64, bias=False),
    ):
        model = build_model(RunConfig(model=cfg))  # layernorm, as the estimate counts
        for seq in (64, 256):
            assert flops_per_token(cfg, seq) == model.flops_per_token(seq), (cfg, seq)


def test_gpt2_124m_flops_per_token_is_nanogpts_count():
    from bln_sweeps.config import ModelConfig
    from launchers.cost import flops_per_token

    # 124,439,808 parameters at block size 1024 (GPT-2 small), less wpe (1024 x 768)
    n = 124_439_808 - 1024 * 768
    cfg = ModelConfig(name="gpt2_124m", vocab_size=50257, n_layer=12, n_head=12, n_embd=768)
    assert flops_per_token(cfg, 1024) == 6 * n + 12 * 12 * 768 * 1024


def dry_run(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "launchers", "--dry-run", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_dry_run_prints_compute_per_cell_and_in_total(tmp_path):
    from bln_sweeps.config import ModelConfig
    from launchers.cost import flops_per_token

    p = dry_run(
        "norm=layernorm,bln", "batch=b4", "launcher.assumed_tflops=0.5", *FAST, cwd=tmp_path
    )
    assert p.returncode == 0, p.stderr
    # FAST: 12 steps x 1024 tokens per step; 8 trials + 3 confirm seeds (conf/sweep.yaml)
    flops = 11 * 12 * 1024 * flops_per_token(ModelConfig(), 64)
    hours = flops / 0.5e12 / 3600
    assert f"norm=bln: 11 runs, {flops:.2e} FLOPs, {hours:,.2f} CPU-hours" in p.stdout, p.stdout
    assert f"total: {2 * flops:.2e} FLOPs" in p.stdout
    assert "launcher.assumed_tflops=0.5" in p.stdout
    assert list(tmp_path.iterdir()) == []  # nothing created, no MLflow store opened for writing


def test_dry_run_without_a_throughput_says_how_to_get_one(tmp_path):
    p = dry_run("norm=layernorm", "batch=b4", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "CPU-hours unknown" in p.stdout and "launcher.assumed_tflops" in p.stdout
    assert "bln-sweep calibrate" in p.stdout


@pytest.mark.parametrize(
    "args, key",
    [
        (["search.budget_hours=-1"], "search.budget_hours"),
        (["search.budget_hours=0"], "search.budget_hours"),
        (["launcher.assumed_tflops=-3"], "launcher.assumed_tflops"),
        (["stop", "nosuch"], "nosuch"),
        (["stop"], "usage: bln-sweep stop NAME"),
        (["status", "nosuch", "--follow"], "nosuch"),
        (["status", "x", "--watch"], "--follow"),
        (["calibrate", "search.budget_hours=-1"], "search.budget_hours"),
    ],
)
def test_bad_input_is_one_line_and_creates_nothing(args, key, tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "launchers", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], p.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_calibrate_measures_each_cell_shape_and_dry_run_uses_it(tmp_path):
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "launchers",
            "calibrate",
            "norm=layernorm,bln",
            "batch=b4,b16",
            *FAST,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    measured = json.loads((tmp_path / "sweeps" / "calibration.json").read_text())
    assert sorted(measured) == sorted(
        f"tiny|{n}|b{b}|s64|cpu" for n in ("layernorm", "bln") for b in (4, 16)
    )
    assert all(m["tokens_per_s"] > 0 and m["flops_per_s"] > 0 for m in measured.values())
    p = dry_run("norm=layernorm,bln", "batch=b4,b16", *FAST, cwd=tmp_path)
    assert "bln-sweep calibrate on cpu" in p.stdout and "unknown" not in p.stdout, p.stdout


# ---- the view, end to end: a real sweep through a pseudo-terminal and through a pipe ---------

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.mark.slow
def test_sweep_log_through_a_pipe_is_one_line_per_run(tmp_path):
    """The default grid (3 norms x 2 micro-batches) at 5 trials + 3 confirm seeds = 48 runs: its
    log is the plan, one line per run and a final summary, then the ranked table."""
    p = bln_sweep("sweep.name=log48", "search.n_trials=5", *FAST, cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    assert not ANSI.search(out)  # no cursor codes in a log file
    log, table = out.split("\n**", 1)  # the ranked table starts with its bold title
    lines = log.splitlines()
    assert len(lines) <= 60, log
    assert "| norm |" in table
    runs = [x for x in lines if re.match(r"\d\d:\d\d:\d\d (finished|pruned|failed) ", x)]
    facts = sweep_facts(tmp_path / "sweeps" / "log48")
    made = sum(len(c["search"]) + len(c["confirm"]) for c in facts["cells"].values())
    assert len(runs) == made == 48, log  # every run said once, nothing said twice
    assert "cell  trials" not in log  # the per-cell table is not reprinted per change
    assert re.search(r"done +48/48 runs · 0 running · \d+ runs/h", log), log


def read_until(fd: int, seen: bytearray, pattern: bytes, timeout: float) -> bool:
    import select

    deadline = time.monotonic() + timeout
    while pattern not in seen:
        if time.monotonic() > deadline:
            return False
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the child closed the terminal
                return pattern in seen
            if not chunk:
                return pattern in seen
            seen += chunk
    return True


def running_trials(sweep_dir: Path) -> int:
    from launchers.live import poll

    return poll(sweep_dir).running


@pytest.mark.slow
def test_terminal_view_updates_in_place_and_ctrl_c_detaches_then_stop_and_resume(tmp_path):
    import pty

    args = [
        "norm=layernorm,bln",
        "batch=b4",
        "sweep.name=live",
        "search.n_trials=2",
        "search.confirm_seeds=1",
        "search.pruner=none",
        *FAST,
        "train.steps=200",  # long enough to be running when Ctrl-C and stop arrive
        "train.eval_interval=100",
        "train.checkpoint_interval=100",
    ]
    sweep_dir = tmp_path / "sweeps" / "live"
    pid, fd = pty.fork()
    if pid == 0:  # the child: a terminal session of its own, as a user's shell gives
        os.chdir(tmp_path)
        os.environ.update(TERM="xterm-256color", COLUMNS="120", LINES="40")
        os.execv(sys.executable, [sys.executable, "-m", "launchers", *args])
    seen = bytearray()
    try:
        assert read_until(fd, seen, b"runs/h", 300), seen.decode(errors="replace")
        deadline = time.monotonic() + 300
        while running_trials(sweep_dir) == 0:  # a trial in flight
            assert time.monotonic() < deadline
            read_until(fd, seen, b"\x00", 1)
        read_until(fd, seen, b"\x00", 3)  # a redraw or two
        os.write(fd, b"\x03")  # Ctrl-C, as the terminal delivers it: SIGINT to the foreground
        assert read_until(fd, seen, b"bln-sweep stop live", 60), seen.decode(errors="replace")
        read_until(fd, seen, b"\x00", 2)
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    text = seen.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    # redrawn in place: rich moves the cursor up over the previous frame and erases its lines
    assert "\x1b[2K" in text and re.search(r"\x1b\[\d*A", text), text[-2000:]
    plain = ANSI.sub("", text)
    for word in ("norm=layernorm", "norm=bln", "runs/h", "elapsed", "left", "CPU-hours"):
        assert word in plain, word
    assert "detached; the workers go on" in plain and "status live --follow" in plain

    # the workers went on after Ctrl-C: trials keep running or finishing
    from launchers.live import poll

    assert poll(sweep_dir).running + poll(sweep_dir).done > 0
    stop = subprocess.run(
        [sys.executable, "-m", "launchers", "stop", "live"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert "stopped:" in stop.stdout
    snap = poll(sweep_dir)
    assert snap.running == 0
    time.sleep(5)  # a stopped sweep stays stopped: no worker asks for a new trial
    assert poll(sweep_dir).states == snap.states
    status = subprocess.run(
        [sys.executable, "-m", "launchers", "status", "live"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "stopped by bln-sweep stop" in status.stdout, status.stdout
    queued = [t for k, t in snap.trials.items() if snap.states[k].startswith("preempted")]
    for t in queued:  # an interrupted trial waits with its checkpoint, to resume from
        assert (Path(t.user_attrs["run_dir"]) / "ckpt.pt").exists()
    if snap.done < 6:  # stopped before the end: the same command finishes the sweep
        p = bln_sweep(*args, cwd=tmp_path)
        assert p.returncode == 0, p.stdout + p.stderr
    assert_complete(sweep_facts(sweep_dir), 2, 1)


@pytest.mark.slow
def test_budget_hours_ends_the_search_and_confirm_runs_still_run(tmp_path):
    p = bln_sweep(
        "norm=layernorm,bln",
        "batch=b4",
        "sweep.name=capped",
        "search.n_trials=4",
        "search.confirm_seeds=1",
        "search.budget_hours=0.0001",  # 0.36 s: spent by the first trial
        "launcher.workers=1",
        *FAST,
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    facts = sweep_facts(tmp_path / "sweeps" / "capped")
    searched = {name: len(c["search"]) for name, c in facts["cells"].items()}
    assert sum(searched.values()) == 1, searched  # one trial spent the budget; no new ones
    for c in facts["cells"].values():
        assert len(c["confirm"]) == len(c["search"])  # a searched cell is still confirmed
    assert "search ended by search.budget_hours=0.0001" in p.stdout
    status = subprocess.run(
        [sys.executable, "-m", "launchers", "status", "capped"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "(budget)" in status.stdout and "search.budget_hours=0.0001" in status.stdout


# ---- the study, as one experiment config ----------------------------------------------------


def test_gpt2_norms_experiment_composes_with_per_norm_searches_and_an_estimate():
    """`+experiment=gpt2_norms` with its sequence length pinned (8 norms x 1 batch here, so the
    test composes 8 cells instead of 120); the full grid's estimate is in the README."""
    from launchers.cost import estimate, flops_per_token
    from launchers.plan import make_plan

    plan = make_plan(["+experiment=gpt2_norms", "seq=s2048", "batch=b16", "storage.url=null"])
    assert plan.sweep == "gpt2_norms" and len(plan.cells) == 8
    norms = {c.norm.name for c in plan.cell_configs}
    assert norms == {p.stem for p in (ROOT / "conf" / "norm").glob("*.yaml")}  # every variant
    pairs = zip(plan.cell_configs, plan.cells, strict=True)
    spaces = {c.norm.name: cell["space"] for c, cell in pairs}
    assert "norm.options.zeta" in spaces["bln"] and "norm.options.zeta" not in spaces["layernorm"]
    assert "norm.options.warmup_steps" in spaces["powernorm"]
    assert "norm.options.alpha_init" in spaces["dyt"]
    for cfg in plan.cell_configs:
        assert cfg.model.name == "gpt2_124m" and cfg.seq.len == 2048 and cfg.batch.size == 16
        assert cfg.grad_accum * 16 * 2048 == 2**19  # equal tokens per optimizer step
    assert plan.launcher["name"] == "slurm" and plan.launcher["gpus_per_worker"] == 1
    est = estimate(plan, plan.cell_configs, plan.sweeps_dir, None)
    runs = plan.search["n_trials"] + plan.search["confirm_seeds"]
    per_cell = runs * 1000 * 2**19 * flops_per_token(plan.cell_configs[0].model, 2048)
    assert est.unit == "GPU-hours"
    assert est.hours == pytest.approx(8 * per_cell / 300e12 / 3600)


def test_dry_run_throughput_comes_from_the_finished_runs_of_a_store(make_cfg, tmp_path):
    """The estimate's measured source: finished runs in the tracking store, per model and device
    kind, read through MLflow's client; a missing SQLite file is no data and stays missing."""
    from bln_sweeps.train import run
    from launchers.cost import store_throughput

    uri = f"sqlite:///{tmp_path}/store.db"
    result = run(make_cfg(f"tracking.uri={uri}"))
    measured = store_throughput(uri, "cpu")
    assert list(measured) == ["tiny"] and measured["tiny"][1] == 1
    assert measured["tiny"][0] > 0 and result["status"] == "finished"
    assert store_throughput(uri, "cuda") == {}
    missing = tmp_path / "none.db"
    assert store_throughput(f"sqlite:///{missing}", "cpu") == {} and not missing.exists()
