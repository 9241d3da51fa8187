"""The trial worker: ask -> train -> tell against the sweep's shared Optuna storage.

The sweep driver (launchers.prepare) writes `<sweep dir>/manifest.json` (bln_sweeps.sweep.manifest):
the sweep name, the storage and tracking URIs, and every cell (its overrides, search space and
MLflow run id). Workers read it and loop ask -> train -> tell until every budget is spent. No
barrier between trials: a worker that finishes picks the cell with the most budget left at once.
A trial's life off the happy path (heartbeats, reaping, infrastructure retries) is in
bln_sweeps.sweep.retries; `bln-sweep stop` in bln_sweeps.sweep.stop.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bln_sweeps.sweep import optuna_internals
from bln_sweeps.sweep.budget import budget_state, counted, end_budget, search_budget
from bln_sweeps.sweep.manifest import WORKER_KEYS, Manifest, load_manifest
from bln_sweeps.sweep.retries import Heartbeat, reap_dead_trials, retry_after_infrastructure_error
from bln_sweeps.sweep.space import make_pruner, make_sampler, open_storage, study_names
from bln_sweeps.sweep.stop import stop_requested
from bln_sweeps.sweep.trial_config import TrialConfigs
from bln_sweeps.tracking.contract import (
    AT_EDGE_TAG,
    CELL_TAG,
    CONFIRM,
    FAILED,
    FINISHED,
    KIND_TAG,
    OPTUNA_STUDY_TAG,
    PRUNED,
    SWEEP_TAG,
    TRIAL,
    TRIAL_TAG,
)
from bln_sweeps.tracking.runs import end_running_runs


@dataclass
class TrialJob:
    """One asked trial on its way through train and tell."""

    cell: Any  # a manifest Cell
    kind: str  # "search" | "confirm"
    study: Any
    trial: Any  # the optuna.trial.Trial study.ask gave
    params: dict[str, Any]
    seed: int
    at_edge: str = ""  # confirm runs: where the best search trial's values lie at an edge
    run_dir: str = ""

    @property
    def confirm(self) -> bool:
        return self.kind == "confirm"


class Worker:
    """One worker job: pulls trials from every cell's study until all budgets are spent."""

    def __init__(self, sweep_dir: Path, worker_id: int = 0, poll_s: float = 2.0):
        self.sweep_dir, self.worker_id, self.poll_s = Path(sweep_dir), worker_id, poll_s
        self.manifest: Manifest = load_manifest(self.sweep_dir, require=WORKER_KEYS)
        self.storage = open_storage(self.manifest.storage_url, self.sweep_dir)
        self.search = self.manifest.search
        self._studies: dict[str, Any] = {}
        self._configs = TrialConfigs(self.manifest)

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
        return study_name[len(self.manifest.sweep) + 1 :]

    def search_budget(self, study) -> int:
        return search_budget(study, self.search)

    def cell_space(self, cell, study) -> dict[str, Any]:
        """The distributions a cell's trials are asked with: its search space, with any range
        widened by search.expand_edges."""
        from bln_sweeps.sweep.design import searched_space

        return searched_space(cell, study)

    def maybe_expand(self, cell, study) -> bool:
        """search.expand_edges: once a cell's search is done, widen every range whose best value
        lies at an edge and grant search.expand_trials more trials in the same study (once)."""
        from bln_sweeps.sweep.design import widened_space

        if not self.search.get("expand_edges") or "expanded" in study.user_attrs:
            return False
        widened = widened_space(self.cell_space(cell, study), study)
        study.set_user_attr("expanded", widened)  # {} records "looked, nothing at an edge"
        return bool(widened) and self.search.get("expand_trials", 0) > 0

    def trial_config(self, cell, params: Mapping[str, Any], seed: int):
        """The validated RunConfig of one trial (bln_sweeps.sweep.trial_config)."""
        return self._configs.config(cell, params, seed)

    # ---- which trial next -------------------------------------------------------------------

    def next_job(self) -> tuple[Any, str] | None | str:
        """(cell, "search" | "confirm"), "wait" while others finish what a job needs, or None."""
        best, pending = self.next_search()
        if best is not None:
            return best
        return self.next_confirm(pending)

    def next_search(self) -> tuple[tuple[Any, str] | None, bool]:
        """(the cell with the most search budget left, or None; whether a running trial may
        still free budget)."""
        best, best_left, pending = None, 0, False
        spent = self.budget_spent()
        for cell in self.manifest.cells:
            study = self.study(study_names(self.manifest.sweep, cell.name)[0])
            reap_dead_trials(study)
            s = budget_state(study, self.search_budget(study))
            if s["left"] <= 0 and not (s["running"] or s["waiting"]):
                if self.maybe_expand(cell, study):
                    s = budget_state(study, self.search_budget(study))
            free = s["left"] + s["waiting"]  # waiting: retries and preempted trials to resume
            if spent and s["left"] > 0:  # no new trial; started ones (waiting) still finish
                free = s["waiting"]
                end_budget(study, spent)
            if free > best_left:
                best, best_left = (cell, "search"), free
            if free <= 0 and s["running"]:
                pending = True
        return best, pending

    def next_confirm(self, pending: bool) -> tuple[Any, str] | None | str:
        """Every search budget is handed out: a cell whose best trial still needs confirm runs."""
        for cell in self.manifest.cells:
            search_name, confirm_name = study_names(self.manifest.sweep, cell.name)
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
        from bln_sweeps.sweep.budget import compute_hours

        cap = self.search.get("budget_hours")
        if not cap:
            return None
        names = [n for c in self.manifest.cells for n in study_names(self.manifest.sweep, c.name)]
        used = compute_hours(
            [self.study(n, confirm=n.endswith("/confirm")) for n in names],
            self.manifest.launcher,
        )
        if used < cap:
            return None
        unit = "GPU" if self.manifest.launcher.get("gpus_per_worker") else "CPU"
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
            if job is None:  # no trial left: end the sweep's and cells' MLflow runs
                end_running_runs(self.manifest.tracking_uri, self.manifest.parent_run_ids)
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

    # ---- one trial: ask, train, tell --------------------------------------------------------

    def run_trial(self, cell, kind: str) -> bool:
        """Ask, train, tell. Returns False when the ask overshot the budget (another worker took
        the last slot first) and the trial was discarded."""
        from bln_sweeps.checkpoint import Preempted

        job = self.ask(cell, kind)
        if job is None:
            return False
        job.run_dir = self.claim(job)
        cfg = self.run_config(job)
        try:
            result = self.train(job, cfg)
        except Preempted as e:
            self.hand_back(job, e)
            raise
        except Exception as e:
            self.fail(job, e)
            return True
        self.tell(job, result)
        return True

    def ask(self, cell, kind: str) -> TrialJob | None:
        """A new (or queued) trial of the cell's search or confirm study, with its params and
        seed; None when the ask overshot the budget (the ask is then failed as `surplus`)."""
        from optuna.trial import TrialState

        search_name, confirm_name = study_names(self.manifest.sweep, cell.name)
        confirm = kind == "confirm"
        study = self.study(confirm_name if confirm else search_name, confirm=confirm)
        budget = self.search["confirm_seeds"] if confirm else self.search_budget(study)
        trial = study.ask({} if confirm else self.cell_space(cell, study))
        earlier = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number]
        retry_of = trial.user_attrs.get("retry_of")
        preempted = trial.user_attrs.get("preempted", 0)
        if retry_of is None and not preempted and sum(counted(t) for t in earlier) >= budget:
            trial.set_user_attr("surplus", True)
            study.tell(trial, state=TrialState.FAIL)
            return None
        if not confirm:
            from bln_sweeps.sweep.design import search_seed

            return TrialJob(cell, kind, study, trial, dict(trial.params), search_seed(self.seed))
        return self.confirm_job(cell, study, trial)

    @property
    def seed(self) -> int:
        return self.manifest.base_seed

    def confirm_job(self, cell, study, trial) -> TrialJob:
        """A confirm run: the best search trial's params, a fresh seed, and whether those params
        lie at an edge of the (possibly widened) search space."""
        from bln_sweeps.sweep.design import confirm_seed, edge_text, edges

        search_study = self.study(study_names(self.manifest.sweep, cell.name)[0])
        best = search_study.best_trial
        params = dict(best.params)
        seed = trial.user_attrs.get("seed")
        # fresh seeds: never the search's (design.confirm_seed), so no confirm run repeats
        # the trial that was selected for being best
        seed = confirm_seed(self.seed, trial.number) if seed is None else seed
        trial.set_user_attr("best_trial", best.number)
        at_edge = edge_text(edges(self.cell_space(cell, search_study), params))
        return TrialJob(cell, "confirm", study, trial, params, seed, at_edge)

    def claim(self, job: TrialJob) -> str:
        """Record where the trial runs (run directory, seed, host, pid, worker): what a retry
        resumes from and what reaping checks. A retried trial keeps its run directory."""
        import os
        import socket

        slug = job.cell.name.replace("=", "-").replace(",", "_")
        run_dir = job.trial.user_attrs.get("run_dir") or str(
            self.sweep_dir / "runs" / slug / f"{job.kind}-{job.trial.number}"
        )
        for k, v in {
            "run_dir": run_dir,
            "seed": job.seed,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "worker": self.worker_id,
        }.items():
            job.trial.set_user_attr(k, v)
        return run_dir

    def run_config(self, job: TrialJob):
        """The trial's RunConfig, with an MLflow run name a person can read."""
        cfg = self.trial_config(job.cell, job.params, job.seed)
        label = f"confirm seed {job.seed}" if job.confirm else f"trial {job.trial.number}"
        cfg.tracking.run_name = f"{cfg.norm.name} · b{cfg.batch.size} · s{cfg.seq.len} · {label}"
        return cfg

    def train(self, job: TrialJob, cfg) -> dict:
        """Train the trial (every DDP rank with it), heartbeat stamped, pruning on each eval."""
        from bln_sweeps import distributed
        from bln_sweeps.train import run

        tags = {
            SWEEP_TAG: self.manifest.sweep,
            CELL_TAG: job.cell.name,
            TRIAL_TAG: str(job.trial.number),
            KIND_TAG: CONFIRM if job.confirm else TRIAL,
            OPTUNA_STUDY_TAG: job.study.study_name,
            **({AT_EDGE_TAG: job.at_edge} if job.confirm else {}),
        }
        trial_id = optuna_internals.trial_id(job.trial)
        with Heartbeat(job.study, trial_id, self.sweep_dir):
            distributed.from_rank0((cfg, Path(job.run_dir)))  # the other ranks train it too
            return run(
                cfg,
                run_dir=Path(job.run_dir),
                parent_run_id=job.cell.mlflow_run_id,
                tags=tags,
                on_eval=self.reporter(job),
            )

    def reporter(self, job: TrialJob):
        """The trainer's on_eval hook: report the search metric to Optuna and ask its pruner."""
        metric = self.search["metric"]

        def report(step: int, metrics: dict[str, float]) -> str | None:
            if job.confirm or metric not in metrics:
                return None
            job.trial.report(metrics[metric], step)
            if job.trial.should_prune():
                return f"pruned by {self.search['pruner']} at step {step}"
            return None

        return report

    def hand_back(self, job: TrialJob, e: Exception) -> None:
        """Checkpoint written. Hand the *same* trial (number, params, run dir, MLflow run id in
        the checkpoint) back as WAITING: the requeued job, or any worker, asks it again and
        resumes from the checkpoint. It never counts twice against the budget."""
        trial = job.trial
        trial.set_user_attr("preempted", trial.user_attrs.get("preempted", 0) + 1)
        trial.set_user_attr("status_reason", str(e))
        trial.set_user_attr("pid", None)
        optuna_internals.hand_back(trial)

    def fail(self, job: TrialJob, e: Exception) -> None:
        """A failed trial: retried when the machine failed it, else failed with its reason."""
        from optuna.trial import TrialState

        from bln_sweeps.credentials import mask_text

        if retry_after_infrastructure_error(job.study, job.trial, job.run_dir, job.seed, e):
            return
        job.trial.set_user_attr("status", FAILED)
        job.trial.set_user_attr("status_reason", mask_text(f"{type(e).__name__}: {e}")[:500])
        job.study.tell(job.trial, state=TrialState.FAIL)

    def tell(self, job: TrialJob, result: dict) -> None:
        from optuna.trial import TrialState

        trial, study = job.trial, job.study
        trial.set_user_attr("status", result["status"])
        trial.set_user_attr("mlflow_run_id", result.get("run_id"))
        if result["status"] == FINISHED:
            study.tell(trial, result[self.search["metric"]])
        elif result["status"] == PRUNED:
            study.tell(trial, state=TrialState.PRUNED)
        else:
            trial.set_user_attr("status_reason", result.get("status_reason", ""))
            study.tell(trial, state=TrialState.FAIL)


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
