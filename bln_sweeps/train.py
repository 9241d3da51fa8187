"""One training run: `run(cfg) -> metrics`. The `bln-train` command around it is bln_sweeps.cli.

`run` is pure (a RunConfig in, a dict out) so sweep workers call it directly. The loop is
nanoGPT's: gradient accumulation, AdamW, warm-up + cosine, global-norm clipping, bf16 autocast on
CUDA. What it adds: validation under every inference mode (bln_sweeps.evaluate), divergence
stops instead of crashes, exact resume from checkpoints (bln_sweeps.checkpoint), and an MLflow
run with the resolved config, provenance and the `leaky` tag as the leak probe measured it on
this model (bln_sweeps.leak, bln_sweeps.tracking).

`run` reads as its steps: set up (bln_sweeps.build) and resume, start or adopt the MLflow run,
the step loop (each optimizer step, its logs, evaluations, signals and checkpoints), then finish
(final evaluation, tags, artifacts, the last checkpoint). A `Trainer` holds what the steps share.
A run's key and names come from bln_sweeps.identity; its loss curve and config file from
bln_sweeps.artifacts.
"""

import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from bln_sweeps import checkpoint, distributed, leak
from bln_sweeps.artifacts import log_artifacts
from bln_sweeps.build import (
    autocast_for,
    build_model,
    build_optimizer,
    device_tags,
    is_leaky,
    lr_at,
    peak_flops,
    pick_device,
)
from bln_sweeps.config import RunConfig
from bln_sweeps.credentials import mask_tree
from bln_sweeps.data import BatchSampler, build_run_data, eval_splits, eval_windows
from bln_sweeps.evaluate import evaluate
from bln_sweeps.identity import params_of, run_key, run_name
from bln_sweeps.tracking import (
    RunLogger,
    ends_runs_on_error,
    provenance_tags,
    resolve_tracking_uri,
)
from bln_sweeps.tracking.contract import (
    DIVERGED,
    FAILED,
    FINISHED,
    KIND_TAG,
    LEAKY_TAG,
    MFU,
    PREEMPTED,
    PRUNED,
    RUN_DIR_TAG,
    RUN_FAILED,
    RUN_FINISHED,
    RUN_KILLED,
    RUNNING,
    SINGLE,
    STATUS_REASON_TAG,
    STATUS_TAG,
    TOKENS_PER_S,
    TRAIN_GRAD_NORM,
    TRAIN_LOSS,
    TRAIN_LR,
    WALL_S,
    flatten_config,
)
from bln_sweeps.tracking.runs import running_run

# (step, metrics) -> None to go on, or a reason to stop now as "pruned" (the sweep's pruner)
EvalHook = Callable[[int, dict[str, float]], str | None]


def inject_fault(fault: str | None, step: int) -> None:
    """Tests only (`train.fault`): `raise@N` raises RuntimeError and `oom@N` raises
    torch.OutOfMemoryError (what CUDA raises) as optimizer step N starts, before its forward."""
    kind, _, at = (fault or "").partition("@")
    if fault is None or int(at) != step:
        return
    if kind == "oom":
        raise torch.OutOfMemoryError(f"injected by train.fault={fault}")
    raise RuntimeError(f"injected by train.fault={fault}")


class Trainer:
    """One run in progress: the model, optimizer, sampler and logger the steps of `run` share,
    and where the loop stands (step, history, the throughput window)."""

    def __init__(self, cfg: RunConfig, run_dir: Path, state: dict | None):
        """Set up: seed, device, data, model, optimizer and sampler, restored from `state` (a
        checkpoint of an unfinished attempt) when given. Everything that can reject the config
        happens here, before an MLflow run exists."""
        self.cfg, self.run_dir = cfg, run_dir
        self.ckpt_path = run_dir / checkpoint.CKPT_NAME
        torch.manual_seed(cfg.seed)
        self.device = device = distributed.setup(pick_device(cfg))  # a DDP rank: its own device
        self.autocast = autocast_for(cfg, device)
        data = build_run_data(cfg)
        self.model = build_model(cfg).to(device)
        self.model.set_activation_checkpointing(cfg.train.activation_checkpointing)
        self.optimizer = build_optimizer(cfg, self.model, device)
        # one global batch of batch.size rows per rank; distributed.shard takes this rank's rows
        self.world = distributed.world_size()
        self.sampler = BatchSampler(
            data.train, cfg.batch.size * self.world, cfg.seq.len, seed=cfg.seed
        )
        # Selection (val) and test windows: fixed by eval.tokens and seq.len, whatever the batch.
        self.held_out = {
            split: tuple(t.to(device) for t in eval_windows(tokens, cfg.seq.len, cfg.eval.tokens))
            for split, tokens in eval_splits(data.val).items()
        }
        self.step, self.history = 0, {"train_step": [], "train_loss": [], "eval_step": []}
        if state is not None:
            self._resume(state)
        fwd = distributed.wrap(self.model, device)  # DDP over the ranks; the model when alone
        self.fwd = torch.compile(fwd) if cfg.train.compile else fwd  # norms switch to fusable code
        self.metrics: dict[str, float] = {}  # the last evaluation's
        self.logger: RunLogger | None = None

    def _resume(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        checkpoint.set_rng_state(state["rng"])
        self.step, self.history = state["step"], state["history"]

    # ---- the MLflow run ------------------------------------------------------------------------

    def start_tracking(
        self, state: dict | None, parent_run_id: str | None, tags: dict[str, str] | None
    ) -> None:
        """Start the run's MLflow run, or adopt the one an earlier attempt started. The run id is
        kept beside the checkpoint from the moment the run exists, so an attempt that died before
        its first checkpoint is continued (from step 0), never left RUNNING. The id file is made
        empty before the run is created: an attempt killed between the two leaves it empty, and
        its run is then found by its `run_dir` tag, which the run is created with."""
        cfg = self.cfg
        leaky = is_leaky(self.model)
        uri = resolve_tracking_uri(cfg.tracking.uri, Path.cwd())
        id_file = self.run_dir / checkpoint.RUN_ID_NAME
        earlier = state["run_id"] if state else None
        if earlier is None and cfg.train.resume and id_file.exists():
            earlier = id_file.read_text().strip() or running_run(
                uri, cfg.tracking.experiment, {RUN_DIR_TAG: str(self.run_dir.resolve())}
            )
        if earlier is None and cfg.tracking.enabled and distributed.is_rank0():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            id_file.write_text("")
        start = (uri, leaky, parent_run_id, tags)
        try:
            self.logger = self._start_logger(earlier, *start)
        except ValueError:  # the earlier attempt's run is not in this store (tracking.uri changed)
            if state is not None:
                raise
            earlier, self.logger = None, self._start_logger(None, *start)
        if earlier is not None:
            self.logger.set_tags({"resumed_from_step": str(self.step)})

    def _start_logger(
        self,
        run_id: str | None,
        uri: str,
        leaky: bool,
        parent_run_id: str | None,
        tags: dict[str, str] | None,
    ) -> RunLogger:
        cfg, history = self.cfg, self.history
        if not cfg.tracking.enabled or not distributed.is_rank0():
            return RunLogger.disabled()
        return RunLogger.start(
            uri,
            cfg.tracking.experiment,
            run_name=run_name(cfg),
            # from step 0: also into the run of an attempt that died before its first checkpoint
            # (the same values, which MLflow accepts again), as that one may have logged none
            params=flatten_config(params_of(cfg)) if self.step == 0 else None,
            tags={
                **provenance_tags(),
                **device_tags(self.device),
                LEAKY_TAG: str(leaky).lower(),  # declared; the leak probe's measurement replaces it
                **(leak.summary(history["leak"]) if history.get("leak") else {}),
                KIND_TAG: SINGLE,
                "run_key": run_key(cfg),
                "n_ranks": str(self.world),
                "n_params": str(self.model.num_params()),
                STATUS_TAG: RUNNING,
                RUN_DIR_TAG: str(self.run_dir.resolve()),
                **(tags or {}),
            },
            parent_run_id=parent_run_id,
            run_id=run_id,
            on_created=(self.run_dir / checkpoint.RUN_ID_NAME).write_text,
        )

    # ---- the step loop -------------------------------------------------------------------------

    def train(self, on_eval: EvalHook | None) -> tuple[str, str]:
        """Optimizer steps until train.steps, divergence or the pruner: (status, reason). A stop
        signal saves a checkpoint and raises checkpoint.Preempted; any other exception tags the
        MLflow run failed with its reason before it propagates."""
        cfg = self.cfg
        self.accum = cfg.grad_accum
        self.tokens_per_step = self.accum * cfg.batch.size * cfg.seq.len
        self.diverge_at = cfg.train.diverge_loss or 2 * math.log(cfg.model.vocab_size)
        self.flops_per_step = self.model.flops_per_token(cfg.seq.len) * self.tokens_per_step
        self.peak = peak_flops(self.device)
        self.t_start = self.t_window = time.perf_counter()
        self.window_steps = 0
        self.wall_before = self.history.get("wall_s", 0.0)
        try:
            with checkpoint.StopSignals() as signals:
                while self.step < cfg.train.steps:
                    stop = self._step_and_report(on_eval)
                    if stop is not None:
                        return stop
                    self._after_step(signals)
            return FINISHED, ""
        except checkpoint.Preempted:
            raise
        except BaseException as e:
            reason = f"{type(e).__name__}: {e}"[:500]
            self.logger.set_tags({STATUS_TAG: FAILED, STATUS_REASON_TAG: reason})
            self.logger.end(RUN_FAILED)
            raise

    def _optimizer_step(self) -> tuple[float, float, float]:
        """One optimizer step over grad_accum micro-batches: (train loss, lr, grad norm). The loss
        is averaged over the ranks, so every rank reaches the same verdict on it."""
        cfg, model, accum = self.cfg, self.model, self.accum
        leak.probe_when_due(
            model, self.sampler, self.step, self.autocast, self.history, self.logger
        )
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        model.train()
        inject_fault(cfg.train.fault, self.step + 1)
        loss_sum = 0.0
        for _ in range(accum):
            x, y = distributed.shard(*self.sampler.next_batch())
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with self.autocast():
                _, loss = self.fwd(x, y)
            (loss / accum).backward()  # mean over the optimizer step's micro-batches
            loss_sum += loss.item()
        clip = cfg.optim.grad_clip or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.window_steps += 1
        train_loss = distributed.mean(loss_sum / accum)
        self.history["train_step"].append(self.step)
        self.history["train_loss"].append(train_loss)
        return train_loss, lr, grad_norm

    def _step_and_report(self, on_eval: EvalHook | None) -> tuple[str, str] | None:
        """One step, its train metrics and evaluation when due; (status, reason) to stop now."""
        cfg = self.cfg
        train_loss, lr, grad_norm = self._optimizer_step()
        step = self.step
        if not math.isfinite(train_loss) or train_loss > self.diverge_at:
            limit = f"{self.diverge_at:.3g}"
            return DIVERGED, f"train loss {train_loss:.4g} at step {step} (limit {limit})"
        if step % cfg.train.log_interval == 0 or step == cfg.train.steps:
            self._log_train(train_loss, lr, grad_norm)
        if step % cfg.train.eval_interval == 0 or step == cfg.train.steps:
            # the test split is scored once, at the end: nothing during training reads it
            last = step == cfg.train.steps
            self.metrics = self.evaluate(("val", "test") if last else ("val",))
            stop = on_eval(step, self.metrics) if on_eval is not None else None
            stop = distributed.from_rank0(stop)  # rank 0 talks to the pruner
            self.t_window, self.window_steps = time.perf_counter(), 0  # eval is not training
            if stop:
                return PRUNED, stop
        return None

    def _log_train(self, train_loss: float, lr: float, grad_norm: float) -> None:
        """Train metrics and throughput over the steps since the window last restarted."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - self.t_window
        m = {TRAIN_LOSS: train_loss, TRAIN_LR: lr, TRAIN_GRAD_NORM: grad_norm}
        m[TOKENS_PER_S] = self.window_steps * self.tokens_per_step / dt
        if self.peak:
            m[MFU] = self.flops_per_step * self.window_steps / dt / self.peak
        self.logger.log_metrics(m, step=self.step)
        self.t_window, self.window_steps = time.perf_counter(), 0

    def _after_step(self, signals: checkpoint.StopSignals) -> None:
        """Wall time, then a stop signal on any rank (save and raise Preempted), then the
        periodic checkpoint."""
        step = self.step
        self.history["wall_s"] = self.wall_before + time.perf_counter() - self.t_start
        received = distributed.signal_on_any_rank(signals.received)
        if received is not None:
            self.save(RUNNING)
            self.logger.set_tags({STATUS_TAG: PREEMPTED, STATUS_REASON_TAG: "signal"})
            self.logger.end(RUN_KILLED)
            raise checkpoint.Preempted(step, received, self.ckpt_path)
        ckpt_every = self.cfg.train.checkpoint_interval
        if ckpt_every and step % ckpt_every == 0 and step < self.cfg.train.steps:
            self.save(RUNNING)
            self.t_window = time.perf_counter()  # the save is not training time

    def evaluate(self, splits: tuple[str, ...] = ("val",)) -> dict[str, float]:
        cfg, metrics = self.cfg, {}
        for split in splits:
            metrics |= evaluate(
                self.model,
                self.held_out[split],
                cfg.batch.size,
                self.autocast,
                cfg.eval.batch_stats,
                cfg.eval.bln_switches,
                split=split,
            )
        self.history["eval_step"].append(self.step)
        for k, v in metrics.items():
            self.history.setdefault(k, []).append(v)
        self.logger.log_metrics(metrics, step=self.step)
        return metrics

    def save(self, status: str, result: dict | None = None) -> None:
        if not distributed.is_rank0():  # the ranks hold the same state; one writes it
            return
        checkpoint.save(
            self.ckpt_path,
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "sampler": self.sampler.state_dict(),
                "rng": checkpoint.rng_state(),
                "step": self.step,
                "history": self.history,
                "run_id": self.logger.run_id,
                "status": status,
                "result": result,
                "config": mask_tree(asdict(self.cfg)),  # a checkpoint may be copied or shared
            },
        )

    # ---- the end -------------------------------------------------------------------------------

    def finish(self, status: str, reason: str) -> dict:
        """Final evaluation (when the loop did not just evaluate), the result, its tags and
        artifacts, the last checkpoint; the MLflow run ends (diverged: FAILED)."""
        metrics, history, logger = self.metrics, self.history, self.logger
        if status == FINISHED and self.step not in history["eval_step"]:
            metrics = self.evaluate(("val", "test"))
        wall = history.get("wall_s", 0.0)
        logger.log_metrics({WALL_S: wall}, step=self.step)
        result = {
            **metrics,
            "status": status,
            "step": self.step,
            "run_id": logger.run_id,
            "wall_s": wall,
        }
        if reason:
            result["status_reason"] = reason
        logger.set_tags({STATUS_TAG: status, **({STATUS_REASON_TAG: reason} if reason else {})})
        if self.cfg.tracking.enabled and distributed.is_rank0():
            log_artifacts(logger, self.run_dir, self.cfg, history)
        self.save(status, result)
        logger.end(RUN_FAILED if status == DIVERGED else RUN_FINISHED)  # pruned ends normally
        return result


@ends_runs_on_error  # every way out of a run ends its MLflow run, never leaves it RUNNING
def run(
    cfg: RunConfig,
    *,
    run_dir: Path | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    on_eval: EvalHook | None = None,
) -> dict:
    """Train one model as `cfg` says and return its final metrics plus `status` and `run_id`.

    A checkpoint in `run_dir` (default `<train.out_dir>/<run key>`) is resumed; one marked
    finished returns its stored result. Raises checkpoint.Preempted after saving on SIGTERM /
    SIGUSR1. `on_eval` sees every evaluation; a reason it returns stops the run as "pruned".
    """
    run_dir = Path(run_dir or Path(cfg.train.out_dir) / run_key(cfg))
    state = checkpoint.load(run_dir / checkpoint.CKPT_NAME) if cfg.train.resume else None
    if state is not None and state["status"] != RUNNING:
        return state["result"]
    with distributed.group_of_this_run():
        return _train(cfg, run_dir, state, parent_run_id, tags, on_eval)


def _train(cfg, run_dir, state, parent_run_id, tags, on_eval) -> dict:
    """The run's steps. Its own frame, so that the Trainer (and the DDP model it holds) is
    gone when the process group of a multi-rank run ends."""
    trainer = Trainer(cfg, run_dir, state)
    trainer.start_tracking(state, parent_run_id, tags)
    status, reason = trainer.train(on_eval)
    return trainer.finish(status, reason)
