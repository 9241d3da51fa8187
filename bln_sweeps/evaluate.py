"""Held-out losses under each inference mode, leaving every buffer exactly as it was.

Two fixed splits are scored the same way (bln_sweeps.data.eval_splits): `val/...` is the selection
split the search and the pruner read, `test/...` the held-out split tables report. The headline
number of a split is `<split>/loss`: `model.eval()`, i.e. population (running) statistics, the only
mode in which every variant is causal and batch-independent (NORMS.md §8). Side by side, so the
train/inference gap and any leak are visible:

- `<split>/loss@batch`: the train-mode forward (current-batch statistics) on held-out data. For a
  leaky norm this is the optimistic number a train-mode loss would report.
- `<split>/loss@bln-XXXX`: BLN's four inference switches (batch_moving_mean, batch_moving_var,
  feature_moving_mean, feature_moving_var) as T/F, e.g. `bln-TTFF` (the official default).
- `dyt/saturated@<site>` (DyT models): the fraction of |alpha * x| > 2 at each site kind (ln_1,
  ln_2, ln_f, ...; averaged over layers) in the `val/loss` pass. tanh is flat there (slope < 0.07),
  and early saturation predicts DyT losing to LayerNorm at small GPT-2 scale (NORMS.md §10).

Evaluation is a pure function of the weights and buffers at that moment. Train-mode forwards
update running statistics (BatchNorm, BLN, PowerNorm's phi and iters), even under no_grad, so
every batch of every mode starts from one snapshot of the buffers, restored after: no mode and no
batch sees another's updates, and the order of the batches changes no value.
"""

import itertools
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext

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
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    autocast,
    snapshot: dict[str, torch.Tensor] | None = None,
) -> float:
    """Mean loss per token over the batches (each weighted by its rows). With `snapshot`, every
    batch starts from those buffers. fsum is exact, so the batch order cannot change the sum."""
    parts, rows = [], 0
    with torch.no_grad():
        for x, y in batches:  # x, y: (B, T)
            if snapshot is not None:
                restore_buffers(model, snapshot)
            with autocast():
                _, loss = model(x, y)
            parts.append(loss.item() * len(x))
            rows += len(x)
    return math.fsum(parts) / rows


def restore_buffers(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    for name, b in model.named_buffers():
        b.copy_(snapshot[name])


def chunks(x: torch.Tensor, y: torch.Tensor, batch_size: int):
    """(N, T) windows -> (B, T) batches of the cell's batch size (the last may be smaller)."""
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]


def evaluate(
    model: nn.Module,
    windows: tuple[torch.Tensor, torch.Tensor],
    batch_size: int,
    autocast,
    batch_stats: bool = True,
    bln_codes: Iterable[str] = (),
    split: str = "val",
) -> dict[str, float]:
    """Losses of one split keyed by logical metric name (`<split>/loss`, `<split>/loss@<mode>`).

    windows: (x, y), each (N, T), the split's fixed windows; they are fed in batches of
    `batch_size` rows, the sample the batch-statistic modes normalize over."""
    batches = chunks(*windows, batch_size)
    out = {}
    saturation: dict[str, float] = {}  # DyT's diagnostic, from the selection split's pass only
    watch = dyt_saturation(model, saturation) if split == "val" else nullcontext()
    with frozen_buffers(model):
        snapshot = {name: b.detach().clone() for name, b in model.named_buffers()}
        model.eval()
        with watch:
            out[f"{split}/loss"] = mean_loss(model, batches, autocast, snapshot)
        if batch_stats:
            model.train()
            for m in model.modules():  # batch statistics, but no dropout noise
                if isinstance(m, nn.Dropout):
                    m.eval()
            out[f"{split}/loss@batch"] = mean_loss(model, batches, autocast, snapshot)
        if has_bln(model):
            model.eval()
            codes = ALL_BLN_SWITCHES if "all" in bln_codes else list(dict.fromkeys(bln_codes))
            for code in codes:
                with bln_switches(model, code):
                    out[f"{split}/loss@bln-{code}"] = mean_loss(model, batches, autocast, snapshot)
    return {**out, **saturation}
