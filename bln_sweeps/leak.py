"""The leak probe: is this model, in train mode, causal? Measured, not declared.

A norm declares `causal_in_train`; the tables' † used to trust that declaration. The probe
measures it on the exact model a run trains (the method nanochat#845 proposes, NORMS.md §10):

    logits  = model(x)           x (B, T): a real training batch, norms in train mode
    logits' = model(x')          x' = x with every token after position t changed in sequence 0
    max_delta = max |logits - logits'| over positions <= t of EVERY sequence

A causal model cannot let positions <= t see tokens after t, in its own sequence or (through
batch statistics) in another one, so max_delta is 0 up to float noise. The noise floor is
measured too: the unchanged batch is run twice, and a leak is a delta above both LEAK_ATOL and
NOISE_FACTOR times that floor (bitwise 0 on CPU; on a GPU whatever its kernels give: measured,
not assumed).

The probe changes nothing a run could notice: no gradients, every buffer (running statistics,
PowerNorm's phi and call counter) restored, torch's RNG forked, the training sampler's state
restored after its next batch is read, dropout off (it would be noise, not a leak). Training with
and without it is bitwise identical on CPU; a test proves it.

`train.run` probes before the first optimizer step and once more when PowerNorm's warm-up (which
divides by current-batch statistics) has ended; `bln-train --probe-leak ...` probes alone.
"""

import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from bln_sweeps.evaluate import frozen_buffers
from bln_sweeps.tracking.contract import LEAKY_TAG

LEAK_ATOL = 1e-5  # |delta logit| below this is never a leak (fp32 logits are O(1..10))
NOISE_FACTOR = 8.0  # a leak must stand this far above the run-to-run noise of the same batch


@dataclass(frozen=True)
class LeakReport:
    step: int  # optimizer steps taken when measured
    t: int  # tokens after position t of sequence 0 were changed
    max_delta: float  # largest |logit change| at positions <= t, over every sequence
    noise: float  # largest |logit change| between two runs of the same batch
    leaked: bool  # max_delta above LEAK_ATOL and NOISE_FACTOR * noise
    declared_causal: bool  # every norm site declares causal_in_train (at this step)
    warmup: bool  # some norm was in its warm-up (PowerNorm): probe again when it ends
    seconds: float  # wall time of the probe (three forward passes)

    @property
    def mismatch(self) -> bool:
        return self.leaked == self.declared_causal

    def line(self) -> str:
        verdict = "LEAKS" if self.leaked else "causal"
        declared = "causal" if self.declared_causal else "leaky"
        text = (
            f"leak probe at step {self.step}: {verdict} (max |delta logit| at positions <= "
            f"{self.t} = {self.max_delta:.3g}, noise {self.noise:.3g}); declared {declared}"
        )
        if self.mismatch:
            text += " -- MISMATCH: the declared causal_in_train is wrong for this model"
        return text

    def as_dict(self) -> dict:
        return asdict(self)


def declared_causal(model: nn.Module) -> bool:
    """What the norm modules declare for their next train-mode forward. PowerNorm declares itself
    leaky for the whole run when it has a warm-up; past the warm-up (`in_warmup` False) its
    forward divides by running statistics only, so it counts as causal then."""
    for _, norm in model.norm_modules():
        if getattr(norm, "causal_in_train", True):
            continue
        if getattr(norm, "in_warmup", True):
            return False
    return True


def in_warmup(model: nn.Module) -> bool:
    """Whether some norm still divides by current-batch statistics (PowerNorm's warm-up)."""
    return any(getattr(norm, "in_warmup", False) for _, norm in model.norm_modules())


def peek_batch(sampler) -> torch.Tensor:
    """The sampler's next training inputs x (B, T), the sampler's state (RNG and count) restored
    afterwards, so training sees exactly the batches it would have seen without the probe."""
    state = sampler.state_dict()
    try:
        x, _ = sampler.next_batch()
    finally:
        sampler.load_state_dict(state)
    return x


def probe(
    model: nn.Module, x: torch.Tensor, step: int, autocast=None, t: int | None = None
) -> LeakReport:
    """Measure whether `model` in train mode lets positions <= t see tokens after t. x (B, T)."""
    start = time.perf_counter()
    B, T = x.shape
    if T < 2:
        raise ValueError(f"the leak probe needs sequences of at least 2 tokens (got {T})")
    t = T // 2 - 1 if t is None else t  # the first half is compared; the second half changes
    vocab = model.config.vocab_size
    changed = x.clone()
    changed[0, t + 1 :] = (x[0, t + 1 :] + 1) % vocab  # every later token of sequence 0, new id
    declared = declared_causal(model)
    norms = {id(m) for _, m in model.norm_modules()}

    def logits_of(batch: torch.Tensor) -> torch.Tensor:
        with frozen_buffers(model), torch.no_grad():
            # train mode for the norms (batch statistics, the thing under test); everything else
            # in eval mode, i.e. without dropout
            for m in model.modules():
                m.train(id(m) in norms)
            with (autocast or nullcontext)():
                return model(batch)[0]  # (B, T, vocab)

    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        # one (B, T, vocab) tensor besides the reference at a time: at GPT-2 scale each is GBs
        ref = logits_of(x)
        noise = _max_abs_diff(ref, logits_of(x))
        max_delta = _max_abs_diff(ref[:, : t + 1], logits_of(changed)[:, : t + 1])
    leaked = max_delta > max(LEAK_ATOL, NOISE_FACTOR * noise)
    return LeakReport(
        step=step,
        t=t,
        max_delta=max_delta,
        noise=noise,
        leaked=leaked,
        declared_causal=declared,
        warmup=in_warmup(model),
        seconds=time.perf_counter() - start,
    )


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in fp32, one sequence at a time (no full-size temporary)."""
    return max((a[i].float() - b[i].float()).abs().max().item() for i in range(a.shape[0]))


def summary(reports: list[dict]) -> dict[str, str]:
    """MLflow tags from every probe of a run (dicts as LeakReport.as_dict, kept in the run's
    history so a resumed run keeps them): `leak.measured` true when any probe saw a leak,
    `leak.max_delta` / `leak.step` of the probe that decided it (the largest delta), and
    `leak.mismatch` when a probe contradicted the declarations. `leaky` is the measured value."""
    worst = max(reports, key=lambda r: (r["leaked"], r["max_delta"]))
    measured = any(r["leaked"] for r in reports)
    mismatch = any(r["leaked"] == r["declared_causal"] for r in reports)
    return {
        LEAKY_TAG: str(measured).lower(),
        "leak.measured": str(measured).lower(),
        "leak.max_delta": f"{worst['max_delta']:.6g}",
        "leak.step": str(worst["step"]),
        "leak.probes": ",".join(str(r["step"]) for r in reports),
        "leak.mismatch": str(mismatch).lower(),
    }


def due(model: nn.Module, reports: list[dict]) -> bool:
    """Before the first optimizer step (no probe yet), and once more at the first step after a
    warm-up that was running at the last probe."""
    return not reports or (reports[-1]["warmup"] and not in_warmup(model))


def probe_when_due(model, sampler, step: int, autocast, history: dict, logger) -> None:
    """train.run's one call, at the top of every step: probe when `due`, keep the report in
    `history["leak"]` (checkpointed with it, so a resumed run neither loses nor repeats a probe),
    tag the run with `summary`, log `leak/max_delta` at the step, and say a mismatch in one line."""
    reports = history.setdefault("leak", [])
    if not due(model, reports):
        return
    device = next(model.parameters()).device
    report = probe(model, peek_batch(sampler).to(device), step, autocast)
    reports.append(report.as_dict())
    logger.set_tags(summary(reports))
    logger.log_metrics({"leak/max_delta": report.max_delta}, step=step)
    if report.mismatch:
        print(f"bln-train: {report.line()}", file=sys.stderr)


def probe_config(cfg) -> LeakReport:
    """`bln-train --probe-leak`: build the run's model (seed, device, dtype as `train.run` would)
    and probe it on the run's first training batch, without training or an MLflow run."""
    from bln_sweeps.build import autocast_for, build_model, pick_device
    from bln_sweeps.data import BatchSampler, build_run_data

    torch.manual_seed(cfg.seed)
    device = pick_device(cfg)
    autocast = autocast_for(cfg, device)  # the dtype rule train.run uses
    model = build_model(cfg).to(device)
    sampler = BatchSampler(build_run_data(cfg).train, cfg.batch.size, cfg.seq.len, seed=cfg.seed)
    return probe(model, peek_batch(sampler).to(device), 0, autocast)
