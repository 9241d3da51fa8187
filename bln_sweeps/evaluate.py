"""Validation loss under each inference mode, leaving every buffer exactly as it was.

The headline number is `val/loss`: `model.eval()`, i.e. population (running) statistics, the only
mode in which every variant is causal and batch-independent (NORMS.md §8). Side by side, so the
train/inference gap and any leak are visible:

- `val/loss@batch`: the train-mode forward (current-batch statistics) on validation data. For a
  leaky norm this is the optimistic number a train-mode loss would report.
- `val/loss@bln-XXXX`: BLN's four inference switches (batch_moving_mean, batch_moving_var,
  feature_moving_mean, feature_moving_var) as T/F, e.g. `bln-TTFF` (the official default).
- `dyt/saturated@<site>` (DyT models): the fraction of |alpha * x| > 2 at each site kind (ln_1,
  ln_2, ln_f, ...; averaged over layers) in the `val/loss` pass. tanh is flat there (slope < 0.07),
  and early saturation predicts DyT losing to LayerNorm at small GPT-2 scale (NORMS.md §10).

Train-mode forwards update running statistics (BatchNorm, BLN, PowerNorm's phi and iters), even
under no_grad, so every mode snapshots the buffers first and restores them after.
"""

import itertools
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

from bln_sweeps.norms import DyT

BLN_SWITCHES = (
    "batch_moving_mean",
    "batch_moving_var",
    "feature_moving_mean",
    "feature_moving_var",
)
ALL_BLN_SWITCHES = ["".join(c) for c in itertools.product("TF", repeat=4)]  # 16 combinations


@contextmanager
def frozen_buffers(model: nn.Module) -> Iterator[None]:
    """Restore every buffer (running stats, counters) and the train/eval flags on exit."""
    saved = {name: b.detach().clone() for name, b in model.named_buffers()}
    modes = {m: m.training for m in model.modules()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(saved[name])
        for m, training in modes.items():
            m.training = training


@contextmanager
def bln_switches(model: nn.Module, code: str) -> Iterator[None]:
    """Set the four inference switches of every BLN module from a code like 'TTFF'."""
    blns = [m for m in model.modules() if all(hasattr(m, s) for s in BLN_SWITCHES)]
    saved = [[getattr(m, s) for s in BLN_SWITCHES] for m in blns]
    try:
        for m in blns:
            for s, c in zip(BLN_SWITCHES, code, strict=True):
                setattr(m, s, c == "T")
        yield
    finally:
        for m, values in zip(blns, saved, strict=True):
            for s, v in zip(BLN_SWITCHES, values, strict=True):
                setattr(m, s, v)


@contextmanager
def dyt_saturation(model: nn.Module, out: dict[str, float]) -> Iterator[None]:
    """Count |alpha * x| > 2 at every DyT site during the block; add the fractions to `out`."""
    counts: dict[str, list[int]] = {}  # site kind -> [saturated, total]

    def hook(kind: str):
        def count(module, args):
            with torch.no_grad():
                x = args[0]  # (B, T, C)
                c = counts.setdefault(kind, [0, 0])
                c[0] += int(((module.alpha * x.float()).abs() > 2).sum())
                c[1] += x.numel()

        return count

    sites = getattr(model, "norm_modules", list)()
    handles = [
        m.register_forward_pre_hook(hook(name.rsplit(".", 1)[-1]))
        for name, m in sites
        if isinstance(m, DyT)
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
    out.update({f"dyt/saturated@{k}": sat / max(n, 1) for k, (sat, n) in sorted(counts.items())})


def has_bln(model: nn.Module) -> bool:
    return any(all(hasattr(m, s) for s in BLN_SWITCHES) for m in model.modules())


def mean_loss(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], autocast
) -> float:
    total, n = 0.0, 0
    with torch.no_grad():
        for x, y in batches:
            with autocast():
                _, loss = model(x, y)
            total += loss.item()
            n += 1
    return total / n


def evaluate(
    model: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    autocast,
    batch_stats: bool = True,
    bln_codes: Iterable[str] = (),
) -> dict[str, float]:
    """Validation losses keyed by logical metric name (`val/loss`, `val/loss@<mode>`)."""
    out = {}
    # Each mode gets its own snapshot: the train-mode pass must not move the running statistics
    # that the eval-mode passes after it read.
    saturation: dict[str, float] = {}
    with frozen_buffers(model), dyt_saturation(model, saturation):
        model.eval()
        out["val/loss"] = mean_loss(model, batches, autocast)
    if batch_stats:
        with frozen_buffers(model):
            model.train()
            for m in model.modules():  # batch statistics, but no dropout noise
                if isinstance(m, nn.Dropout):
                    m.eval()
            out["val/loss@batch"] = mean_loss(model, batches, autocast)
    if has_bln(model):
        codes = ALL_BLN_SWITCHES if "all" in bln_codes else list(dict.fromkeys(bln_codes))
        with frozen_buffers(model):
            model.eval()
            for code in codes:
                with bln_switches(model, code):
                    out[f"val/loss@bln-{code}"] = mean_loss(model, batches, autocast)
    return {**out, **saturation}
