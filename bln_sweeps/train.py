"""One training run: `run(cfg) -> metrics`, and the `bln-train` Hydra app around it.

    bln-train norm=bln batch=b16 seq=s2048 optim.lr=3e-4
    bln-train -m norm=layernorm,bln batch=b4,b32          # a Hydra grid, basic launcher

`run` is pure (a RunConfig in, a dict out) so sweep workers call it directly. The loop is
nanoGPT's: gradient accumulation, AdamW, warm-up + cosine, global-norm clipping, bf16 autocast on
CUDA. What it adds: validation under every inference mode (bln_sweeps.evaluate), divergence
stops instead of crashes, exact resume from checkpoints (bln_sweeps.checkpoint), and an MLflow
run with the resolved config, provenance and the `leaky` tag as the leak probe measured it on
this model (bln_sweeps.leak, bln_sweeps.tracking).
"""

import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch

from bln_sweeps import checkpoint, distributed, leak
from bln_sweeps.config import RunConfig
from bln_sweeps.credentials import mask_tree
from bln_sweeps.data import BatchSampler, build_data, eval_splits, eval_windows
from bln_sweeps.evaluate import evaluate
from bln_sweeps.model import GPT, GPTConfig
from bln_sweeps.norms import NORMS, build_norm
from bln_sweeps.tracking import (
    RunLogger,
    ends_runs_on_error,
    provenance_tags,
    resolve_tracking_uri,
)
from bln_sweeps.tracking.contract import (
    DEVICE_TAG,
    DIVERGED,
    FAILED,
    FINISHED,
    KIND_TAG,
    LEAKY_TAG,
    MFU,
    N_DEVICES_TAG,
    PREEMPTED,
    PRUNED,
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

# Peak dense bf16 FLOP/s per device, for MFU. Unknown devices report no MFU rather than a guess.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}

# (step, metrics) -> None to go on, or a reason to stop now as "pruned" (the sweep's pruner)
EvalHook = Callable[[int, dict[str, float]], str | None]


def run_key(cfg: RunConfig) -> str:
    """Identity of a run for resuming: every setting that changes the numbers."""
    d = asdict(cfg)
    d.pop("tracking")
    for k in ("out_dir", "resume", "checkpoint_interval", "log_interval"):
        d["train"].pop(k)
    d["train"].pop("activation_checkpointing")  # memory for time; the same numbers
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def params_of(cfg: RunConfig) -> dict:
    """The resolved config as MLflow params: everything but where the params themselves go."""
    d = asdict(cfg)
    d.pop("tracking")
    return d


def run_name(cfg: RunConfig) -> str:
    return cfg.tracking.run_name or f"{cfg.norm.name} · b{cfg.batch.size} · s{cfg.seq.len}"


def norm_factory(cfg: RunConfig) -> Callable[[str], torch.nn.Module]:
    """site -> norm module. `norm.name` at ln_1/ln_2 (and Peri-LN's ln_1_out/ln_2_out) with
    `norm.options`; `norm.final` (if set) at ln_f with its own defaults. `norm.sites.<site>`
    overrides options at one site (and may name another variant there, with that variant's
    defaults). Options left null are derived from the run: PowerNorm's warm-up (the LR warm-up,
    as fairseq wires it) and its forward calls per optimizer step."""
    derived = {
        "batch_size": cfg.batch.size,
        "max_len": cfg.model.block_size,
        "groups": cfg.model.n_head,
        "bias": cfg.model.bias,
        "warmup_steps": cfg.warmup_steps,
        "accum_steps": cfg.grad_accum,
    }

    def options_for(name: str, given: dict) -> dict:
        import inspect

        accepted = inspect.signature(NORMS[name]).parameters if name in NORMS else {}
        opts = {k: v for k, v in derived.items() if k in accepted}
        opts.update({k: v for k, v in given.items() if v is not None})
        return opts

    block_opts = options_for(cfg.norm.name, cfg.norm.options)
    if block_opts.get("sync") == "global" and "batch_size" in block_opts:
        block_opts["batch_size"] *= distributed.world_size()  # BLN's m: the global batch
    final = cfg.norm.final or cfg.norm.name
    final_opts = block_opts if final == cfg.norm.name else options_for(final, {})

    def factory(site: str) -> torch.nn.Module:
        name, opts = (final, final_opts) if site == "ln_f" else (cfg.norm.name, block_opts)
        given = dict(cfg.norm.sites.get(site) or {})
        site_name = given.pop("name", None) or name
        if site_name != name:  # another variant at this site: its own defaults
            name, opts = site_name, options_for(site_name, {})
        opts = {**opts, **{k: v for k, v in given.items() if v is not None}}
        return build_norm(name, cfg.model.n_embd, **opts)

    return factory


def build_model(cfg: RunConfig) -> GPT:
    m = cfg.model
    gpt = GPTConfig(
        m.block_size,
        m.vocab_size,
        m.n_layer,
        m.n_head,
        m.n_embd,
        m.dropout,
        m.bias,
        qk_norm=m.qk_norm,
        norm_placement=m.norm_placement,
    )
    return GPT(gpt, norm_factory(cfg))


def is_leaky(model: GPT) -> bool:
    return any(not getattr(mod, "causal_in_train", True) for _, mod in model.norm_modules())


def lr_at(step: int, cfg: RunConfig) -> float:
    """Linear warm-up to optim.lr, then cosine down to min_lr_frac * lr at the last step."""
    peak, warm, total = cfg.optim.lr, cfg.warmup_steps, cfg.train.steps
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    floor = cfg.optim.min_lr_frac * peak
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(progress, 1.0)))


def pick_device(cfg: RunConfig) -> torch.device:
    if cfg.train.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.train.device)


def device_tags(device: torch.device) -> dict[str, str]:
    if device.type == "cuda":
        return {DEVICE_TAG: f"cuda:{torch.cuda.get_device_name(device)}", N_DEVICES_TAG: "1"}
    return {DEVICE_TAG: "cpu", N_DEVICES_TAG: "1", "cpu_threads": str(torch.get_num_threads())}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def plot_losses(history: dict[str, list], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(history["train_step"], history["train_loss"], label="train (batch statistics)", lw=1)
    for key in sorted(k for k in history if k.startswith("val/")):
        ax.plot(history["eval_step"], history[key], marker="o", ms=3, label=key)
    ax.set(xlabel="optimizer step", ylabel="cross-entropy (nats/token)", title=path.stem)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def inject_fault(fault: str | None, step: int) -> None:
    """Tests only (`train.fault`): `raise@N` raises RuntimeError and `oom@N` raises
    torch.OutOfMemoryError (what CUDA raises) as optimizer step N starts, before its forward."""
    kind, _, at = (fault or "").partition("@")
    if fault is None or int(at) != step:
        return
    if kind == "oom":
        raise torch.OutOfMemoryError(f"injected by train.fault={fault}")
    raise RuntimeError(f"injected by train.fault={fault}")


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
    ckpt_path = run_dir / checkpoint.CKPT_NAME
    state = checkpoint.load(ckpt_path) if cfg.train.resume else None
    if state is not None and state["status"] != RUNNING:
        return state["result"]

    torch.manual_seed(cfg.seed)
    device = distributed.setup(pick_device(cfg))  # a rank of a DDP trial: its own device
    use_bf16 = cfg.train.dtype == "bfloat16" or (
        cfg.train.dtype == "auto" and device.type == "cuda"
    )
    autocast = (
        partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)
        if use_bf16
        else nullcontext
    )

    # Everything that can reject the config happens before an MLflow run exists.
    data = build_data(cfg)
    model = build_model(cfg).to(device)
    model.set_activation_checkpointing(cfg.train.activation_checkpointing)
    optimizer = torch.optim.AdamW(
        model.optimizer_groups(cfg.optim.weight_decay),
        lr=cfg.optim.lr,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        eps=cfg.optim.eps,
        fused=device.type == "cuda",
    )
    # one global batch of batch.size rows per rank; distributed.shard takes this rank's rows
    world = distributed.world_size()
    sampler = BatchSampler(data.train, cfg.batch.size * world, cfg.seq.len, seed=cfg.seed)
    # Selection (val) and test windows: fixed by eval.tokens and seq.len, whatever the batch size.
    held_out = {
        split: tuple(t.to(device) for t in eval_windows(tokens, cfg.seq.len, cfg.eval.tokens))
        for split, tokens in eval_splits(data.val).items()
    }
    step, history = 0, {"train_step": [], "train_loss": [], "eval_step": []}
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        checkpoint.set_rng_state(state["rng"])
        step, history = state["step"], state["history"]
    fwd = distributed.wrap(model, device)  # DDP over the ranks; the model itself when alone
    fwd = torch.compile(fwd) if cfg.train.compile else fwd  # norms switch to fusable code

    leaky = is_leaky(model)
    uri = resolve_tracking_uri(cfg.tracking.uri, Path.cwd())
    # The run id is kept beside the checkpoint from the moment the run exists, so an attempt
    # that died before its first checkpoint is continued (from step 0), never left RUNNING.
    run_id_file = run_dir / "mlflow_run_id"
    earlier = state["run_id"] if state else None
    if earlier is None and cfg.train.resume and run_id_file.exists():
        earlier = run_id_file.read_text().strip() or None

    def start_logger(run_id: str | None) -> RunLogger:
        if not cfg.tracking.enabled or not distributed.is_rank0():
            return RunLogger.disabled()
        return RunLogger.start(
            uri,
            cfg.tracking.experiment,
            run_name=run_name(cfg),
            params=flatten_config(params_of(cfg)) if run_id is None else None,
            tags={
                **provenance_tags(),
                **device_tags(device),
                LEAKY_TAG: str(leaky).lower(),  # declared; the leak probe's measurement replaces it
                **(leak.summary(history["leak"]) if history.get("leak") else {}),
                KIND_TAG: SINGLE,
                "run_key": run_key(cfg),
                "n_ranks": str(world),
                "n_params": str(model.num_params()),
                STATUS_TAG: RUNNING,
                **(tags or {}),
            },
            parent_run_id=parent_run_id,
            run_id=run_id,
        )

    try:
        logger = start_logger(earlier)
    except ValueError:  # the earlier attempt's run is not in this store (tracking.uri changed)
        if state is not None:
            raise
        earlier, logger = None, start_logger(None)
    if logger.run_id is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        run_id_file.write_text(logger.run_id)
    if earlier is not None:
        logger.set_tags({"resumed_from_step": str(step)})

    def save(status: str, result: dict | None = None) -> None:
        if not distributed.is_rank0():  # the ranks hold the same state; one writes it
            return
        checkpoint.save(
            ckpt_path,
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "sampler": sampler.state_dict(),
                "rng": checkpoint.rng_state(),
                "step": step,
                "history": history,
                "run_id": logger.run_id,
                "status": status,
                "result": result,
                "config": mask_tree(asdict(cfg)),  # a checkpoint may be copied or shared
            },
        )

    def eval_now(splits: tuple[str, ...] = ("val",)) -> dict[str, float]:
        metrics = {}
        for split in splits:
            metrics |= evaluate(
                model,
                held_out[split],
                cfg.batch.size,
                autocast,
                cfg.eval.batch_stats,
                cfg.eval.bln_switches,
                split=split,
            )
        history["eval_step"].append(step)
        for k, v in metrics.items():
            history.setdefault(k, []).append(v)
        logger.log_metrics(metrics, step=step)
        return metrics

    accum = cfg.grad_accum
    tokens_per_step = accum * cfg.batch.size * cfg.seq.len
    diverge_at = cfg.train.diverge_loss or 2 * math.log(cfg.model.vocab_size)
    flops_per_step = model.flops_per_token(cfg.seq.len) * tokens_per_step
    peak = peak_flops(device)
    status, reason, metrics = FINISHED, "", {}
    t_start, t_window, window_steps = time.perf_counter(), time.perf_counter(), 0
    wall_before = history.get("wall_s", 0.0)
    try:
        with checkpoint.StopSignals() as signals:
            while step < cfg.train.steps:
                leak.probe_when_due(model, sampler, step, autocast, history, logger)
                lr = lr_at(step, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                model.train()
                inject_fault(cfg.train.fault, step + 1)
                loss_sum = 0.0
                for _ in range(accum):
                    x, y = distributed.shard(*sampler.next_batch())
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    with autocast():
                        _, loss = fwd(x, y)
                    (loss / accum).backward()  # mean over the optimizer step's micro-batches
                    loss_sum += loss.item()
                clip = cfg.optim.grad_clip or float("inf")
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                window_steps += 1
                train_loss = distributed.mean(loss_sum / accum)  # every rank: the same verdict
                history["train_step"].append(step)
                history["train_loss"].append(train_loss)

                if not math.isfinite(train_loss) or train_loss > diverge_at:
                    status = DIVERGED
                    reason = f"train loss {train_loss:.4g} at step {step} (limit {diverge_at:.3g})"
                    break
                if step % cfg.train.log_interval == 0 or step == cfg.train.steps:
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    dt = time.perf_counter() - t_window
                    tps = window_steps * tokens_per_step / dt
                    m = {TRAIN_LOSS: train_loss, TRAIN_LR: lr, TRAIN_GRAD_NORM: grad_norm}
                    m[TOKENS_PER_S] = tps
                    if peak:
                        m[MFU] = flops_per_step * window_steps / dt / peak
                    logger.log_metrics(m, step=step)
                    t_window, window_steps = time.perf_counter(), 0
                if step % cfg.train.eval_interval == 0 or step == cfg.train.steps:
                    # the test split is scored once, at the end: nothing during training reads it
                    last = step == cfg.train.steps
                    metrics = eval_now(("val", "test") if last else ("val",))
                    stop = on_eval(step, metrics) if on_eval is not None else None
                    stop = distributed.from_rank0(stop)  # rank 0 talks to the pruner
                    t_window, window_steps = time.perf_counter(), 0  # eval is not training time
                    if stop:
                        status, reason = PRUNED, stop
                        break
                history["wall_s"] = wall_before + time.perf_counter() - t_start
                received = distributed.signal_on_any_rank(signals.received)
                if received is not None:
                    save(RUNNING)
                    logger.set_tags({STATUS_TAG: PREEMPTED, STATUS_REASON_TAG: "signal"})
                    logger.end(RUN_KILLED)
                    raise checkpoint.Preempted(step, received, ckpt_path)
                ckpt_every = cfg.train.checkpoint_interval
                if ckpt_every and step % ckpt_every == 0 and step < cfg.train.steps:
                    save(RUNNING)
                    t_window = time.perf_counter()  # the save is not training time
    except checkpoint.Preempted:
        raise
    except BaseException as e:
        logger.set_tags({STATUS_TAG: FAILED, STATUS_REASON_TAG: f"{type(e).__name__}: {e}"[:500]})
        logger.end(RUN_FAILED)
        raise

    if status == FINISHED and step not in history["eval_step"]:
        metrics = eval_now(("val", "test"))
    wall = history.get("wall_s", 0.0)
    logger.log_metrics({WALL_S: wall}, step=step)
    result = {**metrics, "status": status, "step": step, "run_id": logger.run_id, "wall_s": wall}
    if reason:
        result["status_reason"] = reason
    logger.set_tags({STATUS_TAG: status, **({STATUS_REASON_TAG: reason} if reason else {})})
    if cfg.tracking.enabled and distributed.is_rank0():
        run_dir.mkdir(parents=True, exist_ok=True)
        plot = run_dir / "loss_curve.png"
        plot_losses(history, plot)
        logger.log_artifact(plot)
        cfg_yaml = run_dir / "config.yaml"
        from omegaconf import OmegaConf

        cfg_yaml.write_text(OmegaConf.to_yaml(mask_tree(asdict(cfg))))  # no URL password
        logger.log_artifact(cfg_yaml)
    save(status, result)
    logger.end(RUN_FAILED if status == DIVERGED else RUN_FINISHED)  # pruned ends normally
    return result


def main() -> None:
    from bln_sweeps.cli import train_main

    sys.exit(train_main(sys.argv[1:]))


if __name__ == "__main__":
    main()
