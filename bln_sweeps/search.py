"""Optuna's side of a sweep: search spaces in Hydra's sweep grammar, one study per cell.

A search space is a mapping `dotted.key -> expression` in the grammar Hydra's Optuna sweeper
reads, so existing search files carry over:

    optim.lr: tag(log, interval(1e-4, 3e-3))    # log-uniform float
    optim.weight_decay: interval(0.0, 0.2)       # uniform float
    optim.beta2: choice(0.95, 0.99)              # categorical
    norm.options.warmup_steps: range(0, 200, 50) # stepped int (or float)
    train.eval_batches: int(interval(2, 8))      # uniform int

Torch-free: the sweep driver parses and validates spaces on a login node.
"""

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bln_sweeps.config import ConfigError


def parse_distribution(key: str, expression: Any):
    """One search-space entry -> an optuna distribution. A plain value is not searched (None)."""
    import optuna.distributions as od
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    grammar = (
        "interval(a, b), tag(log, interval(a, b)), int(interval(a, b)), choice(...), range(...)"
    )
    try:
        override = OverridesParser.create().parse_override(f"{key}={expression}")
    except Exception as e:
        raise ConfigError(key, expression, f"not a distribution ({grammar}): {e}") from None
    value = override.value()
    if isinstance(value, IntervalSweep):
        log = "log" in value.tags
        low, high = value.start, value.end
        if not low < high or (log and low <= 0):
            raise ConfigError(key, expression, "needs low < high (and low > 0 on a log scale)")
        if isinstance(low, int) and isinstance(high, int):
            return od.IntDistribution(low, high, log=log)
        return od.FloatDistribution(float(low), float(high), log=log)
    if isinstance(value, RangeSweep):
        step = value.step
        ints = all(isinstance(v, int) for v in (value.start, value.stop, step))
        if step <= 0 or not value.start < value.stop:
            raise ConfigError(key, expression, "range needs start < stop and a positive step")
        # Hydra's range excludes `stop`; optuna's high is inclusive
        if ints:
            high = value.start + ((value.stop - 1 - value.start) // step) * step
            return od.IntDistribution(value.start, high, step=step)
        n = int((value.stop - value.start) / step - 1e-9)
        return od.FloatDistribution(value.start, value.start + n * step, step=step)
    if isinstance(value, ChoiceSweep):
        if not value.list:
            raise ConfigError(key, expression, "choice needs at least one value")
        return od.CategoricalDistribution(value.list)
    if override.is_sweep_override():
        raise ConfigError(key, expression, f"unsupported distribution; use {grammar}")
    return None


def parse_space(space: Mapping[str, Any]) -> dict[str, Any]:
    """A search-space mapping -> {key: optuna distribution}; plain values are dropped (they are
    ordinary overrides, not searched)."""
    out = {}
    for key, expression in space.items():
        dist = parse_distribution(key, expression)
        if dist is not None:
            out[key] = dist
    return out


def override_value(value: Any) -> str:
    """A value as a Hydra override value that arrives verbatim: repr keeps floats exact; strings
    are single-quoted. In Hydra's quoted strings only a quote and the backslashes right before a
    quote (or the end) are escapes, so only those are doubled; `${` is escaped so OmegaConf never
    resolves an interpolation (e.g. `${oc.env:...}`) smuggled in through a value."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        value = value.replace("${", "\\${")
        body = re.sub(r"(\\*)('|$)", _escape_before_quote, value)
        return "'" + body + "'"
    return repr(value)


def _escape_before_quote(m: re.Match) -> str:
    """Backslashes before a quote or the end are doubled; the quote itself is escaped."""
    return m.group(1) * 2 + ("\\'" if m.group(2) else "")


# ---- studies, budgets and the worker loop ---------------------------------------------------
#
# The sweep driver (launchers/) writes `<sweep dir>/manifest.json`: the sweep name, the storage
# and tracking URIs, and every cell (its overrides, search space and MLflow run id). Workers read
# it and loop ask -> train -> tell until every budget is spent. No barrier between trials: a
# worker that finishes picks the cell with the most budget left at once.

HEARTBEAT_S = 10.0  # a running trial's worker stamps the trial this often
GRACE_S = 60.0  # a RUNNING trial whose stamp is older than this lost its worker


def open_storage(url: str | None, sweep_dir: Path):
    """Embedded default: an Optuna journal file in the sweep directory (many local processes,
    no server). Otherwise an RDB URL (PostgreSQL on a cluster)."""
    import optuna

    if not url:
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(sweep_dir / "optuna.journal")))
    return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})


def make_sampler(search: Mapping[str, Any], seed_offset: int = 0):
    import optuna

    seed = search["seed"] + seed_offset
    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed, multivariate=True),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "qmc": lambda: optuna.samplers.QMCSampler(seed=seed),
        "gp": lambda: optuna.samplers.GPSampler(seed=seed),
    }
    if search["sampler"] not in samplers:
        raise ConfigError("search.sampler", search["sampler"], f"valid: {', '.join(samplers)}")
    return samplers[search["sampler"]]()


def make_pruner(search: Mapping[str, Any]):
    import optuna

    warm = search["pruner_warmup_evals"]
    pruners = {
        "none": lambda: optuna.pruners.NopPruner(),
        "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
        "halving": lambda: optuna.pruners.SuccessiveHalvingPruner(),
        "hyperband": lambda: optuna.pruners.HyperbandPruner(),
    }
    if search["pruner"] not in pruners:
        raise ConfigError("search.pruner", search["pruner"], f"valid: {', '.join(pruners)}")
    return PatientStart(pruners[search["pruner"]](), warm)


class PatientStart:
    """Never prune before a trial has reported `evals` evaluations (then ask the inner pruner)."""

    def __init__(self, inner, evals: int):
        self.inner, self.evals = inner, evals

    def prune(self, study, trial) -> bool:
        if len(trial.intermediate_values) < self.evals:
            return False
        return self.inner.prune(study, trial)


def study_names(sweep: str, cell: str) -> tuple[str, str]:
    """(search study, confirm study) of one cell."""
    return f"{sweep}/{cell}", f"{sweep}/{cell}/confirm"


def counted(trial) -> bool:
    """Trials that spend budget: everything but surplus asks and failures that were retried."""
    attrs = trial.user_attrs
    return not attrs.get("surplus") and not attrs.get("retried")


def budget_state(study, budget: int) -> dict[str, int]:
    from optuna.trial import TrialState

    c = {"complete": 0, "pruned": 0, "failed": 0, "running": 0, "waiting": 0}
    names = {
        TrialState.COMPLETE: "complete",
        TrialState.PRUNED: "pruned",
        TrialState.FAIL: "failed",
        TrialState.RUNNING: "running",
        TrialState.WAITING: "waiting",
    }
    for t in study.get_trials(deepcopy=False):
        if counted(t):
            c[names[t.state]] += 1
    c["done"] = c["complete"] + c["pruned"] + c["failed"]
    c["left"] = budget - c["done"] - c["running"] - c["waiting"]
    return c


def reap_dead_trials(study, grace_s: float = GRACE_S) -> int:
    """Fail RUNNING trials whose worker is gone and queue a retry with the same parameters and
    the same run directory, so the retry resumes from the dead trial's last checkpoint."""
    import os
    import socket
    import time

    from optuna.trial import TrialState

    now, host, reaped = time.time(), socket.gethostname(), 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = t.user_attrs
        # a trial resumed after preemption keeps its old stamp: its new start is the later one
        stamp = max(t.system_attrs.get("heartbeat", 0.0), t.datetime_start.timestamp())
        dead = now - stamp > grace_s
        if attrs.get("host") == host and attrs.get("pid"):
            try:
                os.kill(attrs["pid"], 0)
            except ProcessLookupError:
                dead = True
            except PermissionError:
                pass
        if not dead:
            continue
        try:
            study._storage.set_trial_user_attr(t._trial_id, "retried", True)
            study._storage.set_trial_user_attr(t._trial_id, "status_reason", "worker died")
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except Exception:  # another worker reaped it first
            continue
        study.enqueue_trial(
            t.params,
            user_attrs={
                "retry_of": t.number,
                "run_dir": attrs.get("run_dir"),
                "seed": attrs.get("seed"),
            },
        )
        reaped += 1
    return reaped


class Heartbeat:
    """Stamps a running trial every HEARTBEAT_S seconds from a daemon thread, and relays
    `bln-sweep stop` (the sweep's STOP file) to the trainer as the signal it checkpoints on."""

    def __init__(self, study, trial_id: int, sweep_dir: Path | None = None):
        import threading

        self.study, self.trial_id, self.sweep_dir = study, trial_id, sweep_dir
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        import time

        stamped = 0.0
        while not self.stop.wait(STOP_POLL_S):
            if self.sweep_dir is not None and stop_requested(self.sweep_dir):
                relay_stop()
            if time.time() - stamped < HEARTBEAT_S:
                continue
            stamped = time.time()
            try:
                self.study._storage.set_trial_system_attr(self.trial_id, "heartbeat", time.time())
            except Exception:
                return  # the trial finished (or was reaped): nothing left to stamp

    def __enter__(self) -> "Heartbeat":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()


STOP_FILE = "STOP"  # written by `bln-sweep stop NAME`, removed when the sweep is run again
STOP_POLL_S = 1.0


def stop_requested(sweep_dir: Path) -> bool:
    return (Path(sweep_dir) / STOP_FILE).exists()


def relay_stop() -> None:
    """SIGUSR1 to this process once the trainer's handler is installed: it checkpoints after the
    step in flight and raises Preempted, and the worker hands the trial back as WAITING. Before
    that (the run still building its model) the signal would kill the process: wait."""
    import os
    import signal

    from bln_sweeps.checkpoint import StopSignals

    handler = signal.getsignal(signal.SIGUSR1)
    if isinstance(getattr(handler, "__self__", None), StopSignals):
        os.kill(os.getpid(), signal.SIGUSR1)


def budget_ended(study) -> str | None:
    """The note a worker left on a search study when search.budget_hours ended it."""
    return study._storage.get_study_system_attrs(study._study_id).get("budget_ended")


def compute_hours(studies, launcher: Mapping[str, Any], now: float | None = None) -> float:
    """Device-hours the sweep's runs took so far: each run's wall time (running ones up to now)
    x the devices a worker holds (its GPUs, or one CPU worker)."""
    import time

    from optuna.trial import TrialState

    now = time.time() if now is None else now
    seconds = 0.0
    for study in studies:
        for t in study.get_trials(deepcopy=False):
            if t.datetime_start is None or t.state == TrialState.WAITING:
                continue
            end = t.datetime_complete.timestamp() if t.datetime_complete else now
            seconds += max(end - t.datetime_start.timestamp(), 0.0)
    return seconds / 3600 * max(1, launcher.get("gpus_per_worker") or 0)


def load_manifest(sweep_dir: Path) -> dict[str, Any]:
    return json.loads((Path(sweep_dir) / "manifest.json").read_text())


def trial_overrides(manifest: dict, cell: dict, params: Mapping[str, Any], seed: int) -> list[str]:
    """The composed config of one trial: cell grid point + sampled params + seed + tracking."""
    return [
        *manifest["base_overrides"],
        *cell["overrides"],
        *(f"{k}={override_value(v)}" for k, v in params.items()),
        f"seed={seed}",
        f"tracking.uri={override_value(manifest['tracking_uri'])}",
        f"tracking.experiment={override_value(manifest['sweep'])}",
    ]


class Worker:
    """One worker job: pulls trials from every cell's study until all budgets are spent."""

    def __init__(self, sweep_dir: Path, worker_id: int = 0, poll_s: float = 2.0):
        self.sweep_dir, self.worker_id, self.poll_s = Path(sweep_dir), worker_id, poll_s
        self.manifest = load_manifest(self.sweep_dir)
        self.storage = open_storage(self.manifest["storage_url"], self.sweep_dir)
        self.search = self.manifest["search"]
        self._studies: dict[str, Any] = {}
        self._composed: dict[tuple[str, int], Any] = {}  # (cell, seed) -> composed tree

    def study(self, name: str, confirm: bool = False):
        import optuna

        if name not in self._studies:
            self._studies[name] = optuna.load_study(
                study_name=name,
                storage=self.storage,
                sampler=None if confirm else make_sampler(self.search, self.worker_id),
                pruner=optuna.pruners.NopPruner() if confirm else make_pruner(self.search),
            )
        return self._studies[name]

    def trial_config(self, cell: dict, params: Mapping[str, Any], seed: int):
        """The validated RunConfig of one trial: what composing `trial_overrides(...)` gives.

        Hydra composes a cell once per seed (a compose costs a good part of a second) and the
        sampled values are set on a copy, as their overrides would set them. A searched key
        that is not a plain value of the composed tree (a config group such as `batch`) takes
        the full compose."""
        import copy

        from omegaconf import OmegaConf

        from bln_sweeps.config import ALL_GROUPS, compose, to_run_config, validate

        def leaf(tree, key: str) -> bool:
            value = OmegaConf.select(tree, key, default=KeyError)
            return (
                key not in ALL_GROUPS and value is not KeyError and not OmegaConf.is_config(value)
            )

        key = (cell["name"], seed)
        if key not in self._composed:
            overrides = trial_overrides(self.manifest, cell, {}, seed)
            self._composed[key] = compose(overrides, "sweep")
        base = self._composed[key]
        if all(leaf(base, k) for k in params):
            tree = copy.deepcopy(base)
            for k, v in params.items():
                OmegaConf.update(tree, k, v, merge=False)
        else:
            tree = compose(trial_overrides(self.manifest, cell, params, seed), "sweep")
        return validate(to_run_config(tree))

    def next_job(self) -> tuple[dict, str] | None | str:
        """(cell, "search" | "confirm"), "wait" while others finish what a job needs, or None."""
        cells = self.manifest["cells"]
        best, best_left, pending = None, 0, False
        spent = self.budget_spent()
        for cell in cells:
            search_name, confirm_name = study_names(self.manifest["sweep"], cell["name"])
            study = self.study(search_name)
            reap_dead_trials(study)
            s = budget_state(study, self.search["n_trials"])
            free = s["left"] + s["waiting"]  # waiting: retries and preempted trials to resume
            if spent and s["left"] > 0:  # no new trial; started ones (waiting) still finish
                free = s["waiting"]
                if not budget_ended(study):
                    study._storage.set_study_system_attr(study._study_id, "budget_ended", spent)
            if free > best_left:
                best, best_left = (cell, "search"), free
            if free <= 0 and s["running"]:
                pending = True
        if best is not None:
            return best
        for cell in cells:  # every search budget is handed out: confirm runs next
            search_name, confirm_name = study_names(self.manifest["sweep"], cell["name"])
            s = budget_state(self.study(search_name), self.search["n_trials"])
            confirm = self.study(confirm_name, confirm=True)
            reap_dead_trials(confirm)
            c = budget_state(confirm, self.search["confirm_seeds"])
            if c["left"] + c["waiting"] <= 0:
                pending |= bool(c["running"])
                continue
            if s["running"] or s["waiting"]:
                pending = True  # the best trial of this cell is not known yet
                continue
            if s["complete"] == 0:
                continue  # nothing finished to confirm (all pruned or failed)
            return cell, "confirm"
        return "wait" if pending else None

    def budget_spent(self) -> str | None:
        """Why the search must stop (search.budget_hours used up), or None."""
        cap = self.search.get("budget_hours")
        if not cap:
            return None
        names = [
            n
            for c in self.manifest["cells"]
            for n in study_names(self.manifest["sweep"], c["name"])
        ]
        used = compute_hours(
            [self.study(n, confirm=n.endswith("/confirm")) for n in names],
            self.manifest["launcher"],
        )
        if used < cap:
            return None
        unit = "GPU" if self.manifest["launcher"].get("gpus_per_worker") else "CPU"
        return f"search ended by search.budget_hours={cap:g} ({used:.2f} {unit}-hours used)"

    def run(self) -> int:
        """Work until every budget is spent; returns the number of trials this worker ran.
        `bln-sweep stop` ends the loop: no new trial, the running one checkpointed and queued."""
        import time

        from bln_sweeps.checkpoint import Preempted

        n = 0
        while True:
            if stop_requested(self.sweep_dir):
                return n
            job = self.next_job()
            if job is None:
                close_parent_runs(self.manifest)
                return n
            if job == "wait":
                time.sleep(self.poll_s)
                continue
            cell, kind = job
            try:
                ran = self.run_trial(cell, kind)
            except Preempted:
                if stop_requested(self.sweep_dir):
                    return n  # the trial is WAITING with its checkpoint: a rerun resumes it
                raise
            n += ran

    def run_trial(self, cell: dict, kind: str) -> bool:
        """Ask, train, tell. Returns False when the ask overshot the budget (another worker took
        the last slot first) and the trial was discarded."""
        import os
        import socket

        from optuna.trial import TrialState

        search_name, confirm_name = study_names(self.manifest["sweep"], cell["name"])
        confirm = kind == "confirm"
        study = self.study(confirm_name if confirm else search_name, confirm=confirm)
        budget = self.search["confirm_seeds"] if confirm else self.search["n_trials"]
        space = {} if confirm else parse_space(cell["space"])
        trial = study.ask(space)
        store = study._storage
        earlier = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number]
        retry_of = trial.user_attrs.get("retry_of")
        preempted = trial.user_attrs.get("preempted", 0)
        if retry_of is None and not preempted and sum(counted(t) for t in earlier) >= budget:
            store.set_trial_user_attr(trial._trial_id, "surplus", True)
            study.tell(trial, state=TrialState.FAIL)
            return False

        if confirm:
            best = self.study(search_name).best_trial
            params = dict(best.params)
            seed = trial.user_attrs.get("seed")
            seed = trial.number if seed is None else seed
            store.set_trial_user_attr(trial._trial_id, "best_trial", best.number)
        else:
            params = dict(trial.params)
            seed = self.manifest["base_seed"]
        slug = cell["name"].replace("=", "-").replace(",", "_")
        run_dir = trial.user_attrs.get("run_dir") or str(
            self.sweep_dir / "runs" / slug / f"{kind}-{trial.number}"
        )
        for k, v in {
            "run_dir": run_dir,
            "seed": seed,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "worker": self.worker_id,
        }.items():
            store.set_trial_user_attr(trial._trial_id, k, v)

        from bln_sweeps.checkpoint import Preempted
        from bln_sweeps.train import run

        cfg = self.trial_config(cell, params, seed)
        label = f"confirm seed {seed}" if confirm else f"trial {trial.number}"
        cfg.tracking.run_name = f"{cfg.norm.name} · b{cfg.batch.size} · s{cfg.seq.len} · {label}"
        metric = self.search["metric"]

        def report(step: int, metrics: dict[str, float]) -> str | None:
            if confirm or metric not in metrics:
                return None
            trial.report(metrics[metric], step)
            return (
                f"pruned by {self.search['pruner']} at step {step}"
                if trial.should_prune()
                else None
            )

        tags = {
            "sweep": self.manifest["sweep"],
            "cell": cell["name"],
            "trial": str(trial.number),
            "kind": "confirm" if confirm else "trial",
            "optuna.study": study.study_name,
        }
        try:
            with Heartbeat(study, trial._trial_id, self.sweep_dir):
                result = run(
                    cfg,
                    run_dir=Path(run_dir),
                    parent_run_id=cell.get("mlflow_run_id"),
                    tags=tags,
                    on_eval=report,
                )
        except Preempted as e:
            # Checkpoint written. Hand the *same* trial (number, params, run dir, MLflow run id in
            # the checkpoint) back as WAITING: the requeued job, or any worker, asks it again and
            # resumes from the checkpoint. It never counts twice against the budget.
            store.set_trial_user_attr(trial._trial_id, "preempted", preempted + 1)
            store.set_trial_user_attr(trial._trial_id, "status_reason", str(e))
            store.set_trial_user_attr(trial._trial_id, "pid", None)
            store.set_trial_state_values(trial._trial_id, TrialState.WAITING)
            raise
        except Exception as e:
            store.set_trial_user_attr(trial._trial_id, "status", "failed")
            store.set_trial_user_attr(
                trial._trial_id, "status_reason", f"{type(e).__name__}: {e}"[:500]
            )
            study.tell(trial, state=TrialState.FAIL)
            return True
        store.set_trial_user_attr(trial._trial_id, "status", result["status"])
        store.set_trial_user_attr(trial._trial_id, "mlflow_run_id", result.get("run_id"))
        if result["status"] == "finished":
            study.tell(trial, result[metric])
        elif result["status"] == "pruned":
            study.tell(trial, state=TrialState.PRUNED)
        else:
            store.set_trial_user_attr(
                trial._trial_id, "status_reason", result.get("status_reason", "")
            )
            study.tell(trial, state=TrialState.FAIL)
        return True


def worker_main(sweep_dir: str, worker_id: int = 0) -> int:
    """Entry point of a worker job (what the launchers submit)."""
    return Worker(Path(sweep_dir), worker_id).run()


def close_parent_runs(manifest: dict) -> None:
    """End the sweep's and cells' MLflow runs once no trial is left (any worker may do it)."""
    from bln_sweeps.tracking import tracking_client

    client = tracking_client(manifest["tracking_uri"])
    for run_id in [c["mlflow_run_id"] for c in manifest["cells"]] + [manifest["mlflow_run_id"]]:
        if run_id and client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "FINISHED")
