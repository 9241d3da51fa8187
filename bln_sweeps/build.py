"""RunConfig -> the things a run trains: norm factory, model, optimizer, LR schedule, device.

Every function here is a pure translation of the config (no MLflow, no checkpoints, no loop), so
`bln-train`'s up-front check, the leak probe, the cost estimate and `train.run` build the same
objects the same way. Model flavours are composed from `conf/model/*.yaml`, the only list of them.
"""

import inspect
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import replace
from functools import partial

import torch

from bln_sweeps import distributed
from bln_sweeps.config import ModelConfig, RunConfig
from bln_sweeps.model import GPT, GPTConfig
from bln_sweeps.norms import NORMS, build_norm
from bln_sweeps.tracking.contract import DEVICE_TAG, N_DEVICES_TAG

# Peak dense bf16 FLOP/s per device, for MFU. Unknown devices report no MFU rather than a guess.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


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


def gpt_config(m: ModelConfig) -> GPTConfig:
    return GPTConfig(
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


def flavour(name: str, **overrides) -> GPTConfig:
    """The GPTConfig of `conf/model/<name>.yaml` (tiny, gpt2_124m, ...), fields replaced by
    `overrides`. Composed by Hydra, so an unknown name is a ConfigError naming the valid ones."""
    from bln_sweeps.compose import compose
    from bln_sweeps.config import to_run_config

    return replace(gpt_config(to_run_config(compose([f"model={name}"])).model), **overrides)


def build_model(cfg: RunConfig) -> GPT:
    return GPT(gpt_config(cfg.model), norm_factory(cfg))


def build_optimizer(cfg: RunConfig, model: GPT, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on >= 2-D weights only (GPT.optimizer_groups); fused on CUDA."""
    return torch.optim.AdamW(
        model.optimizer_groups(cfg.optim.weight_decay),
        lr=cfg.optim.lr,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        eps=cfg.optim.eps,
        fused=device.type == "cuda",
    )


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


def autocast_for(cfg: RunConfig, device: torch.device) -> Callable:
    """A context-manager factory: bf16 autocast (train.dtype bfloat16, or auto on CUDA) or none."""
    use_bf16 = cfg.train.dtype == "bfloat16" or (
        cfg.train.dtype == "auto" and device.type == "cuda"
    )
    if use_bf16:
        return partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)
    return nullcontext


def device_tags(device: torch.device) -> dict[str, str]:
    if device.type == "cuda":
        return {DEVICE_TAG: f"cuda:{torch.cuda.get_device_name(device)}", N_DEVICES_TAG: "1"}
    return {DEVICE_TAG: "cpu", N_DEVICES_TAG: "1", "cpu_threads": str(torch.get_num_threads())}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)
