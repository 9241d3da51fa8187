"""Watching a sweep: what `bln-sweep` shows while its workers run, and `bln-sweep status NAME
--follow`.

Two renderings of the same polled state (the sweep's Optuna studies):

- a terminal gets one display, redrawn in place by rich: the per-cell table, an overall bar of runs
  done / budget with runs per hour, elapsed and estimated time left, compute used so far, and the
  last few events;
- anything else (a log file, CI, a pipe) gets one line per event (a run finished, was pruned,
  failed, was retried or preempted) and a summary line every few minutes, so a 48-run sweep's log
  is about 50 lines instead of a table per change.

Events come from comparing each poll's trial states with the previous poll's; trials already
finished when watching starts (a resumed or reattached sweep) are not replayed.
"""

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from bln_sweeps.sweep.budget import counted
from bln_sweeps.sweep.manifest import VIEW_KEYS, load_manifest
from bln_sweeps.sweep.space import open_storage, study_names

RECENT = 6  # events kept on the terminal display


@dataclass
class Snapshot:
    """One poll of a sweep: per-cell rows, totals and the trial states events are diffed from."""

    rows: list[dict]
    states: dict[tuple[str, str, int], str]  # (cell, search|confirm, number) -> status word
    trials: dict[tuple[str, str, int], object]  # the FrozenTrial behind each state
    done: int = 0  # runs finished, pruned or failed (retried and surplus asks do not count)
    running: int = 0
    budget: int = 0  # runs the sweep will make: trials + confirm runs still possible
    device_hours: float = 0.0  # wall time of every run so far x devices per worker
    started: float | None = None  # the first run's start (epoch seconds)
    last: float | None = None  # the latest run's end: where a finished sweep's clock stops
    budget_note: str = ""  # set when search.budget_hours ended the search
    unit: str = "CPU-hours"
    finished: bool = False


def status_word(t) -> str | None:
    """A trial's state as the live view names it; None for asks that never became runs."""
    from optuna.trial import TrialState

    attrs = t.user_attrs
    if attrs.get("surplus"):
        return None
    if t.state == TrialState.COMPLETE:
        return "finished"
    if t.state == TrialState.PRUNED:
        return "pruned"
    if t.state == TrialState.FAIL:
        return "retried" if attrs.get("retried") else "failed"
    if t.state == TrialState.WAITING:
        # a preempted trial handed back to the queue; the count makes a second preemption new
        n = attrs.get("preempted", 0)
        return f"preempted:{n}" if n else "queued"
    return "running"


def poll(sweep_dir: Path) -> Snapshot:
    import optuna

    from bln_sweeps.sweep.budget import budget_ended, budget_state, compute_hours, search_budget
    from launchers.progress import cell_rows

    m = load_manifest(sweep_dir, require=VIEW_KEYS)
    storage = open_storage(m.storage_url, sweep_dir)
    seeds = m.search["confirm_seeds"]
    snap = Snapshot(rows=cell_rows(sweep_dir), states={}, trials={})
    snap.unit = "GPU-hours" if m.launcher.get("gpus_per_worker", 0) else "CPU-hours"
    studies = []
    for cell in m.cells:
        search_name, confirm_name = study_names(m.sweep, cell.name)
        search = optuna.load_study(study_name=search_name, storage=storage)
        confirm = optuna.load_study(study_name=confirm_name, storage=storage)
        studies += [search, confirm]
        n_trials = search_budget(search, m.search)  # more once search.expand_edges widened
        s, c = budget_state(search, n_trials), budget_state(confirm, seeds)
        snap.done += s["done"] + c["done"]
        snap.running += s["running"] + c["running"]
        # a cell whose trials were all pruned or failed has nothing to confirm; a search cut
        # short by the compute budget makes only the trials it started
        searched = s["done"] + s["running"] + s["waiting"]
        ended = budget_ended(search)
        settled = (s["left"] <= 0 or ended) and not (s["running"] or s["waiting"])
        snap.budget += (searched if ended else n_trials) + (
            0 if settled and s["complete"] == 0 else seeds
        )
        if ended:
            snap.budget_note = ended
        for kind, study in (("search", search), ("confirm", confirm)):
            for t in study.get_trials(deepcopy=False):
                word = status_word(t)
                if word is None:
                    continue
                key = (cell.name, kind, t.number)
                snap.states[key], snap.trials[key] = word, t
                if t.datetime_start is not None and counted(t):
                    start = t.datetime_start.timestamp()
                    snap.started = start if snap.started is None else min(snap.started, start)
                if t.datetime_complete is not None and counted(t):
                    end = t.datetime_complete.timestamp()
                    snap.last = end if snap.last is None else max(snap.last, end)
    snap.device_hours = compute_hours(studies, m.launcher)
    snap.finished = all(r["finished"] for r in snap.rows)
    return snap


def events(before: Snapshot | None, now: Snapshot, metric: str) -> list[str]:
    """One line per run that finished, was pruned, failed, retried or preempted since `before`."""
    if before is None:
        return []
    out = []
    for key, word in now.states.items():
        if word in ("running", "queued") or before.states.get(key) == word:
            continue
        cell, kind, number = key
        t = now.trials[key]
        who = f"confirm seed {t.user_attrs.get('seed', number)}" if kind == "confirm" else ""
        who = who or f"trial {number}"
        reason = str(t.user_attrs.get("status_reason", "")).splitlines()
        reason = reason[0][:80] if reason else ""
        if word == "finished":
            detail = f"{metric} {t.value:.4f}"
        elif word == "pruned":
            steps = list(t.intermediate_values)
            detail = f"at step {max(steps)}" if steps else ""
        elif word.startswith("preempted"):
            word, detail = "preempted", f"checkpointed, back in the queue ({reason})"
        elif word == "retried":
            detail = f"{reason or 'worker died'}; retried from its checkpoint"
        else:
            detail = reason
        out.append(f"{clock()} {word:<9} {cell}  {who}  {detail}".rstrip())
    return out


def summary(snap: Snapshot, now: float | None = None) -> str:
    """The overall progress in one line: runs done / budget, rate, elapsed, time left, compute."""
    elapsed, rate, left = timing(snap, now)
    parts = [
        f"{snap.done}/{snap.budget} runs",
        f"{snap.running} running",
        f"{rate:.0f} runs/h" if rate else "— runs/h",
        f"elapsed {duration(elapsed)}",
        f"left ~{duration(left)}" if left is not None else "left —",
        f"{snap.device_hours:.2f} {snap.unit}",
    ]
    if snap.budget_note:
        parts.append(snap.budget_note)
    return " · ".join(parts)


def timing(snap: Snapshot, now: float | None = None) -> tuple[float, float, float | None]:
    now = time.time() if now is None else now
    if snap.finished and snap.last is not None:
        now = snap.last
    elapsed = now - snap.started if snap.started is not None else 0.0
    rate = snap.done / elapsed * 3600 if elapsed > 0 and snap.done else 0.0
    todo = max(snap.budget - snap.done, 0)
    left = todo / rate * 3600 if rate else (0.0 if snap.finished else None)
    return elapsed, rate, left


def duration(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "—"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def clock() -> str:
    return time.strftime("%H:%M:%S")


def view(snap: Snapshot, recent: list[str]):
    """The terminal display: cell table, overall bar, recent events."""
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("cell", "trials", "running", "complete", "pruned", "failed", "best", "confirm"):
        table.add_column(col, justify="left" if col == "cell" else "right")
    for r in snap.rows:
        best = "—" if math.isnan(r["best"]) else f"{r['best']:.4f}"
        style = "green" if r["finished"] else None
        table.add_row(
            r["cell"],
            r["trials"],
            str(r["running"]),
            str(r["complete"]),
            str(r["pruned"]),
            str(r["failed"]),
            best,
            r["confirm"],
            style=style,
        )
    bar = ProgressBar(total=max(snap.budget, 1), completed=snap.done, width=60)
    overall = Table.grid()
    overall.add_row(bar)
    overall.add_row(Text(summary(snap), no_wrap=True, overflow="ellipsis"))
    parts = [table, Text(""), overall]
    if recent:
        parts.append(Text("\n".join(recent[-RECENT:]), style="dim"))
    return Group(*parts)


def watch(
    sweep_dir: Path,
    jobs: list,
    stream: TextIO | None = None,
    poll_s: float = 2.0,
    summary_s: float = 300.0,
) -> bool:
    """Follow a sweep until every cell is finished (True) or every worker job stopped first
    (False). A KeyboardInterrupt propagates to the caller, which detaches."""
    stream = stream or sys.stdout
    metric = load_manifest(sweep_dir, require=VIEW_KEYS).search["metric"]
    if stream.isatty():
        return _watch_terminal(sweep_dir, jobs, stream, poll_s, metric)
    return _watch_lines(sweep_dir, jobs, stream, poll_s, summary_s, metric)


def _stopped(jobs: list) -> bool:
    return bool(jobs) and all(j.done() for j in jobs)


def _watch_terminal(sweep_dir, jobs, stream, poll_s, metric) -> bool:
    from rich.console import Console
    from rich.live import Live

    console = Console(file=stream)
    before, recent = None, []
    snap = poll(sweep_dir)
    # auto_refresh off: the display changes when a poll says so, and a redraw between polls
    # would only move the clock
    with Live(view(snap, recent), console=console, auto_refresh=False) as live:
        while True:
            before, snap = snap, poll(sweep_dir)
            recent += events(before, snap, metric)
            live.update(view(snap, recent), refresh=True)
            if snap.finished:
                return True
            if _stopped(jobs):
                return poll(sweep_dir).finished
            time.sleep(poll_s)


def _watch_lines(sweep_dir, jobs, stream, poll_s, summary_s, metric) -> bool:
    def say(line: str) -> None:
        print(line, file=stream, flush=True)

    snap = poll(sweep_dir)
    if snap.done or snap.running:  # joined a sweep under way: where it stands (a fresh one's
        say(f"{clock()} watching  {summary(snap)}")  # plan was just printed)
    last_summary = time.monotonic()
    while True:
        before, snap = snap, poll(sweep_dir)
        for line in events(before, snap, metric):
            say(line)
        if snap.finished or _stopped(jobs):
            say(f"{clock()} {'done' if snap.finished else 'stopped':<9} {summary(snap)}")
            return snap.finished
        if time.monotonic() - last_summary >= summary_s:
            say(f"{clock()} progress  {summary(snap)}")
            last_summary = time.monotonic()
        time.sleep(poll_s)
