"""Optuna's side of a sweep: search spaces in Hydra's sweep grammar, one study per cell.

A search space is a mapping `dotted.key -> expression` in the grammar Hydra's Optuna sweeper
reads, so existing search files carry over:

    optim.lr: tag(log, interval(1e-4, 3e-3))    # log-uniform float
    optim.weight_decay: interval(0.0, 0.2)       # uniform float
    optim.beta2: choice(0.95, 0.99)              # categorical
    norm.options.warmup_steps: range(0, 200, 50) # stepped int 0, 50, ..., 200 (stop included)
    train.steps: int(interval(100, 400))         # uniform int
    model.n_layer: shuffle(range(2, 5))          # categorical of 2, 3, 4 (what range iterates)

`range(start, stop, step)` means what it means to Hydra's Optuna sweeper: `stop` is included.
As a grid axis on the command line it is Hydra's basic sweeper's range, which excludes `stop`.

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
        return _range_distribution(key, expression, value, override)
    if isinstance(value, ChoiceSweep):
        if not value.list:
            raise ConfigError(key, expression, "choice needs at least one value")
        return od.CategoricalDistribution(value.list)
    if override.is_sweep_override():
        raise ConfigError(key, expression, f"unsupported distribution; use {grammar}")
    return None


def _range_distribution(key: str, expression: Any, value, override):
    """range() as Hydra's Optuna sweeper reads it (a search file carries over unchanged): `stop`
    is the inclusive high of a stepped int or float distribution; shuffle(range(...)) is a
    categorical of the values the range iterates (stop excluded, as Hydra iterates it)."""
    import optuna.distributions as od
    from hydra.core.override_parser.types import Transformer

    if value.shuffle:
        return od.CategoricalDistribution(list(override.sweep_iterator(Transformer.encode)))
    start, stop, step = value.start, value.stop, value.step
    if step <= 0 or not start < stop:
        raise ConfigError(key, expression, "range needs start < stop and a positive step")
    if all(isinstance(v, int) for v in (start, stop, step)):
        return od.IntDistribution(start, stop, step=step)
    return od.FloatDistribution(float(start), float(stop), step=float(step))


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


def make_sampler(search: Mapping[str, Any], cell: str = ""):
    """The sampler stream of one cell (bln_sweeps.design: seeded from search.seed and the cell,
    start-up trials sized by the budget)."""
    from bln_sweeps.design import cell_sampler

    return cell_sampler(search, cell)


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
    """The sweep's manifest with its real storage and tracking URLs (the manifest itself holds
    masked ones; bln_sweeps.credentials)."""
    from bln_sweeps.credentials import with_private

    return with_private(json.loads((Path(sweep_dir) / "manifest.json").read_text()), sweep_dir)


INFRA_RETRIES = 3  # a trial failed by the machine, not by its config, is tried this often more


def infrastructure_error(error: BaseException) -> bool:
    """True for failures of the machine rather than of the trial's config: a full or failing disk,
    a tracking or storage backend that stopped answering. Such a trial is retried, not spent."""
    if isinstance(error, OSError):  # ENOSPC, EIO, connection refused or reset, timeouts
        return True
    package = type(error).__module__.split(".")[0]
    if package in ("sqlalchemy", "psycopg", "psycopg2", "requests", "urllib3"):
        return True
    # MLflow's client reports a backend it cannot reach as INTERNAL_ERROR or
    # TEMPORARILY_UNAVAILABLE; bad values and missing runs have their own codes.
    code = getattr(error, "error_code", None)
    return package == "mlflow" and code in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE")


def retry_after_infrastructure_error(study, trial, run_dir: str, seed, error) -> bool:
    """Fail `trial` as retried and queue it again with the same params, seed and run directory
    (so the retry resumes from its checkpoint in its MLflow run). False when `error` is not an
    infrastructure error or the trial has been retried INFRA_RETRIES times already."""
    from optuna.trial import TrialState

    from bln_sweeps.credentials import mask_text

    attempt = trial.user_attrs.get("infra_attempt", 0) + 1
    if not infrastructure_error(error) or attempt > INFRA_RETRIES:
        return False
    store = study._storage
    reason = mask_text(f"{type(error).__name__}: {error}")[:500]
    store.set_trial_user_attr(trial._trial_id, "retried", True)
    store.set_trial_user_attr(trial._trial_id, "status_reason", f"retried: {reason}")
    study.tell(trial, state=TrialState.FAIL)
    study.enqueue_trial(
        trial.params,
        user_attrs={
            "retry_of": trial.number,
            "run_dir": run_dir,
            "seed": seed,
            "infra_attempt": attempt,
        },
    )
    return True


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
                sampler=None if confirm else make_sampler(self.search, self.cell_of(name)),
                pruner=optuna.pruners.NopPruner() if confirm else make_pruner(self.search),
            )
        return self._studies[name]

    def cell_of(self, study_name: str) -> str:
        """The cell a search study belongs to (its sampler stream is keyed by the cell)."""
        return study_name[len(self.manifest["sweep"]) + 1 :]

    def search_budget(self, study) -> int:
        return search_budget(study, self.search)

    def cell_space(self, cell: dict, study) -> dict[str, Any]:
        """The distributions a cell's trials are asked with: its search space, with any range
        widened by search.expand_edges."""
        return searched_space(cell, study)

    def maybe_expand(self, cell: dict, study) -> bool:
        """search.expand_edges: once a cell's search is done, widen every range whose best value
        lies at an edge and grant search.expand_trials more trials in the same study (once)."""
        if not self.search.get("expand_edges") or "expanded" in study.user_attrs:
            return False
        widened = widened_space(self.cell_space(cell, study), study)
        study.set_user_attr("expanded", widened)  # {} records "looked, nothing at an edge"
        return bool(widened) and self.search.get("expand_trials", 0) > 0

    def trial_config(self, cell: dict, params: Mapping[str, Any], seed: int):
        """The validated RunConfig of one trial: what composing `trial_overrides(...)` gives.

        Hydra composes a cell once per seed (a compose costs a good part of a second) and the
        sampled values are set on a copy, as their overrides would set them. A searched key
        that is not a plain value of the composed tree (a config group such as `batch`) takes
        the full compose."""
        import copy

        from omegaconf import OmegaConf

        from bln_sweeps.compose import compose
        from bln_sweeps.config import ALL_GROUPS, to_run_config, validate

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
            s = budget_state(study, self.search_budget(study))
            if s["left"] <= 0 and not (s["running"] or s["waiting"]):
                if self.maybe_expand(cell, study):
                    s = budget_state(study, self.search_budget(study))
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
            search_study = self.study(search_name)
            s = budget_state(search_study, self.search_budget(search_study))
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
        budget = self.search["confirm_seeds"] if confirm else self.search_budget(study)
        space = {} if confirm else self.cell_space(cell, study)
        trial = study.ask(space)
        store = study._storage
        earlier = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number]
        retry_of = trial.user_attrs.get("retry_of")
        preempted = trial.user_attrs.get("preempted", 0)
        if retry_of is None and not preempted and sum(counted(t) for t in earlier) >= budget:
            store.set_trial_user_attr(trial._trial_id, "surplus", True)
            study.tell(trial, state=TrialState.FAIL)
            return False

        at_edge = ""
        if confirm:
            from bln_sweeps.design import confirm_seed, edge_text, edges

            search_study = self.study(search_name)
            best = search_study.best_trial
            params = dict(best.params)
            seed = trial.user_attrs.get("seed")
            # fresh seeds: never the search's (design.confirm_seed), so no confirm run repeats
            # the trial that was selected for being best
            seed = confirm_seed(self.manifest["base_seed"], trial.number) if seed is None else seed
            store.set_trial_user_attr(trial._trial_id, "best_trial", best.number)
            at_edge = edge_text(edges(self.cell_space(cell, search_study), params))
        else:
            from bln_sweeps.design import search_seed

            params = dict(trial.params)
            seed = search_seed(self.manifest["base_seed"])
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

        from bln_sweeps import distributed
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
            **({"at_edge": at_edge} if confirm else {}),
        }
        try:
            with Heartbeat(study, trial._trial_id, self.sweep_dir):
                distributed.from_rank0((cfg, Path(run_dir)))  # the other ranks train it too
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
            if retry_after_infrastructure_error(study, trial, run_dir, seed, e):
                return True
            from bln_sweeps.credentials import mask_text

            store.set_trial_user_attr(trial._trial_id, "status", "failed")
            store.set_trial_user_attr(
                trial._trial_id, "status_reason", mask_text(f"{type(e).__name__}: {e}")[:500]
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


def search_budget(study, search: Mapping[str, Any]) -> int:
    """search.n_trials, plus search.expand_trials once an edge range was widened."""
    extra = search.get("expand_trials", 0) if study.user_attrs.get("expanded") else 0
    return search["n_trials"] + extra


def expansion_pending(study, search: Mapping[str, Any]) -> bool:
    """search.expand_edges is on and no worker has yet looked for edges in this study."""
    return bool(search.get("expand_edges")) and "expanded" not in study.user_attrs


def searched_space(cell: dict, study) -> dict[str, Any]:
    """A cell's distributions: its search space, with the ranges search.expand_edges widened (a
    study user attribute, {key: distribution JSON})."""
    from bln_sweeps.design import from_json

    space = parse_space(cell["space"])
    for key, text in (study.user_attrs.get("expanded") or {}).items():
        space[key] = from_json(text)
    return space


def widened_space(space: dict[str, Any], study) -> dict[str, str]:
    """{key: widened distribution JSON} for every range whose best value is at an edge."""
    from bln_sweeps.design import edges, to_json, widen

    try:
        best = study.best_trial
    except ValueError:  # nothing finished: no best, no edge
        return {}
    return {k: to_json(widen(space[k], e)) for k, e in edges(space, best.params).items()}


def edge_report(sweep_dir: Path) -> list[str]:
    """One line per cell and searched key whose best value lies in the outer tenth of its range:
    the cell, the key, the edge, and the override that widens it. Printed at the end of a sweep."""
    import optuna

    from bln_sweeps.design import edges, expression, widen

    manifest = load_manifest(sweep_dir)
    storage = open_storage(manifest["storage_url"], Path(sweep_dir))
    lines = []
    for cell in manifest["cells"]:
        name = study_names(manifest["sweep"], cell["name"])[0]
        study = optuna.load_study(study_name=name, storage=storage)
        space = searched_space(cell, study)
        try:
            best = study.best_trial
        except ValueError:
            continue
        for key, edge in edges(space, best.params).items():
            wider = f"{{{key}: '{expression(widen(space[key], edge))}'}}"
            where = _space_entry(manifest, cell, key)
            lines.append(
                f"at edge: {cell['name']}: best {key}={best.params[key]:.4g} lies in the {edge}"
                f' tenth of {expression(space[key])}; widen it: "{where}={wider}"'
                f" (or search.expand_edges=true)"
            )
    return lines


def _space_entry(manifest: dict, cell: dict, key: str) -> str:
    """The config key holding a searched key's range: search.params, or search.per_norm.<norm>
    for a norm's own addition."""
    search = manifest["search"]
    if key in search.get("params", {}):
        return "search.params"
    for norm, extra in search.get("per_norm", {}).items():
        if key in extra and f"norm={norm}" in [*manifest["base_overrides"], *cell["overrides"]]:
            return f"search.per_norm.{norm}"
    return "search.params"


def worker_main(sweep_dir: str, worker_id: int = 0) -> int:
    """Entry point of a worker job (what the launchers submit). A job of several tasks
    (launcher.ranks_per_worker > 1) trains every trial as that many DDP ranks: rank 0 runs the
    worker loop (Optuna, MLflow) and hands each trial to the others, which follow."""
    from datetime import timedelta

    import torch

    from bln_sweeps import distributed

    distributed.export_submitit_env()
    if not distributed.requested():
        return Worker(Path(sweep_dir), worker_id).run()
    # the other ranks wait in a broadcast while rank 0 asks Optuna or waits for a budget
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    distributed.setup(device, timeout=timedelta(hours=6))
    if distributed.rank() > 0:
        n = distributed.follow()
    else:
        n = Worker(Path(sweep_dir), worker_id).run()
        distributed.from_rank0(None)  # every budget spent: the other ranks stop
    # A gloo group still alive at interpreter exit can abort the process ("terminate called
    # without an active exception", exit 134), which SLURM records as a FAILED job.
    distributed.teardown()
    return n


def close_parent_runs(manifest: dict) -> None:
    """End the sweep's and cells' MLflow runs once no trial is left (any worker may do it)."""
    from bln_sweeps.tracking import tracking_client

    client = tracking_client(manifest["tracking_uri"])
    for run_id in [c["mlflow_run_id"] for c in manifest["cells"]] + [manifest["mlflow_run_id"]]:
        if run_id and client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "FINISHED")
