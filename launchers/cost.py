"""What a sweep will cost, before it is submitted: FLOPs per cell from the model config, divided by
a throughput, in GPU-hours (CPU-hours on CPU). Torch-free, for `bln-sweep --dry-run` on a login
node; `calibrate` (which imports torch) measures a throughput on the machine it runs on.

FLOPs per token are nanoGPT's `estimate_mfu` count (PaLM appendix B): 6N for the matmuls of the
forward and backward pass plus 12 * L * C * T for attention, N the parameters less the position
embedding. `bln_sweeps.model.GPT.flops_per_token` computes the same from a built model; a test
keeps the two equal. The estimate is an upper bound on training compute: it assumes no trial is
pruned, and leaves out evaluation (a forward pass over a few batches per eval).

Throughput, first found of:
  1. finished runs of the same model on the same kind of device in the sweep's MLflow store
     (median of their achieved FLOP/s = tokens/s x FLOPs per token at their sequence length);
  2. `bln-sweep calibrate` results for the cell's shape (`<sweep.dir>/calibration.json`);
  3. `launcher.assumed_tflops`.
"""

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CALIBRATION = "calibration.json"


def flops_per_token(model: Any, seq_len: int) -> float:
    """Training FLOPs per token of the GPT in bln_sweeps/model.py, from its config alone.

    Parameters without the position embedding (wpe): token embedding (tied with the LM head),
    per block two norms (weight + bias, 2C each), attention c_attn (C x 3C + 3C) and c_proj
    (C x C + C), MLP c_fc (C x 4C + 4C) and c_proj (4C x C + C); the final norm (2C). Norm
    variants with more or fewer parameters than LayerNorm move N by O(C) per norm, under 0.1%
    of GPT-2 124M."""
    get = model.get if isinstance(model, dict) else lambda k: getattr(model, k)
    c, layers, vocab = get("n_embd"), get("n_layer"), get("vocab_size")
    bias = bool(get("bias"))
    linear = 3 * c * c + c * c + 4 * c * c + 4 * c * c
    linear_bias = (3 * c + c + 4 * c + c) if bias else 0
    norms = 2 * (2 * c) if bias else 2 * c
    block = linear + linear_bias + norms
    n = vocab * c + layers * block + (2 * c if bias else c)
    return 6 * n + 12 * layers * c * seq_len


def tokens_per_trial(cfg: Any) -> int:
    """Training tokens one run of `cfg` (a RunConfig) processes: steps x tokens per step."""
    per_step = cfg.batch.tokens_per_step or cfg.batch.size * cfg.seq.len
    return cfg.train.steps * per_step


@dataclass
class CellCost:
    name: str
    runs: int
    flops: float
    hours: float | None  # device-hours; None without a throughput
    source: str = ""


@dataclass
class Estimate:
    cells: list[CellCost]
    unit: str  # GPU-hours | CPU-hours
    workers: int
    devices_per_worker: int
    notes: list[str] = field(default_factory=list)

    @property
    def flops(self) -> float:
        return sum(c.flops for c in self.cells)

    @property
    def hours(self) -> float | None:
        if any(c.hours is None for c in self.cells):
            return None
        return sum(c.hours for c in self.cells)

    @property
    def wall_hours(self) -> float | None:
        """Elapsed time if every worker is busy all along (no queue wait)."""
        h = self.hours
        return None if h is None else h / self.devices_per_worker / self.workers


def estimate(plan, cell_configs: list, sweeps_dir: Path, uri: str | None) -> Estimate:
    """Cost of `plan` (launchers.plan.Plan); `cell_configs` are the cells' RunConfigs."""
    launcher = plan.launcher
    gpus = launcher.get("gpus_per_worker") or 0
    kind = "cuda" if gpus else "cpu"
    runs = plan.search["n_trials"] + plan.search["confirm_seeds"]
    measured = store_throughput(uri, kind)
    calibrated = load_calibration(sweeps_dir)
    assumed = launcher.get("assumed_tflops")
    cells = []
    for cell, cfg in zip(plan.cells, cell_configs, strict=True):
        flops = runs * tokens_per_trial(cfg) * flops_per_token(cfg.model, cfg.seq.len)
        rate, source = None, ""
        if cfg.model.name in measured:
            rate, n = measured[cfg.model.name]
            source = f"median of {n} finished {cfg.model.name} run(s) on {kind} in the store"
        elif (hit := calibrated.get(shape_key(cfg, kind))) is not None:
            rate, source = hit["flops_per_s"], f"bln-sweep calibrate on {hit['device']}"
        elif assumed:
            rate, source = assumed * 1e12, f"launcher.assumed_tflops={assumed:g}"
        hours = None if rate is None else flops / rate / 3600 * max(gpus, 1)
        cells.append(CellCost(cell["name"], runs, flops, hours, source))
    est = Estimate(cells, "GPU-hours" if gpus else "CPU-hours", launcher["workers"], max(gpus, 1))
    if est.hours is None:
        est.notes.append(
            "no throughput known for some cells: set launcher.assumed_tflops=<TFLOP/s per worker>"
            " or run `bln-sweep calibrate` with the same overrides on a compute node"
        )
    return est


def render(est: Estimate, per_cell: bool = True) -> list[str]:
    """--dry-run: a line per cell, the total and how it was estimated. Otherwise (a sweep's log)
    the total alone, in one line."""
    sources = sorted({c.source for c in est.cells if c.source})
    total = est.hours
    if total is None:
        line = f"{est.flops:.2e} FLOPs; {est.unit} unknown"
    else:
        line = (
            f"{est.flops:.2e} FLOPs = {total:,.2f} {est.unit}, about "
            f"{duration(est.wall_hours)} on {est.workers} worker(s)"
            f" (throughput: {'; '.join(sources)})"
        )
    if not per_cell:
        return [f"estimated compute: {line}" + (" (see --dry-run)" if total is None else "")]
    lines = ["estimated compute (upper bound: no trial pruned; training FLOPs, evals left out):"]
    for c in est.cells:
        hours = "?" if c.hours is None else f"{c.hours:,.2f}"
        lines.append(f"  {c.name}: {c.runs} runs, {c.flops:.2e} FLOPs, {hours} {est.unit}")
    lines.append(f"  total: {line}")
    return lines + [f"  {n}" for n in est.notes]


def duration(hours: float | None) -> str:
    if hours is None:
        return "?"
    if hours < 1:
        return f"{hours * 60:.0f} min"
    if hours < 48:
        return f"{hours:.1f} h"
    return f"{hours / 24:.1f} days"


def shape_key(cfg: Any, kind: str) -> str:
    """What a calibration is valid for: model, norm, micro-batch, sequence length, device kind."""
    return f"{cfg.model.name}|{cfg.norm.name}|b{cfg.batch.size}|s{cfg.seq.len}|{kind}"


def load_calibration(sweeps_dir: Path) -> dict:
    path = Path(sweeps_dir) / CALIBRATION
    return json.loads(path.read_text()) if path.is_file() else {}


# ---- throughput of finished runs in an MLflow store -------------------------------------------


def store_throughput(uri: str | None, kind: str) -> dict[str, tuple[float, int]]:
    """{model name: (median achieved FLOP/s, runs)} over finished runs on `kind` (cpu | cuda).

    A missing SQLite file is no data (never a new store), a server is asked with a short
    timeout; anything unreachable is no data, since the estimate falls back to the next source."""
    from bln_sweeps.tracking.uri import SERVER_SCHEMES, sqlite_path

    rows: list[tuple[str, float, int, dict]] = []
    try:
        db = sqlite_path(uri) if uri else None
        if (db is not None and db.is_file()) or (uri and uri.startswith(SERVER_SCHEMES)):
            rows = _store_rows(uri)
    except Exception:
        return {}
    by_model: dict[str, list[float]] = {}
    for model_json, tokens_per_s, seq_len, device in rows:
        if not device.startswith(kind) or not tokens_per_s or not seq_len:
            continue
        model = json.loads(model_json)
        by_model.setdefault(model["name"], []).append(
            tokens_per_s * flops_per_token(model, seq_len)
        )
    return {k: (statistics.median(v), len(v)) for k, v in by_model.items()}


MODEL_KEYS = ("name", "n_embd", "n_layer", "vocab_size", "bias")


def _store_rows(uri: str) -> list:
    """Finished runs with a throughput, through MLflow's client (its tables are analysis's
    business, analysis/_mlflow_sql.py); a server gets a short timeout and no retries."""
    import os

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    from mlflow.tracking import MlflowClient

    from bln_sweeps.tracking.contract import DEVICE_TAG, RUN_FINISHED, TOKENS_PER_S, metric_key

    tps = metric_key(TOKENS_PER_S)
    client = MlflowClient(tracking_uri=uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        ids, f"metrics.`{tps}` > 0 and attributes.status = '{RUN_FINISHED}'", max_results=500
    )
    return [_row(r.data.params, r.data.metrics[tps], r.data.tags.get(DEVICE_TAG, "")) for r in runs]


def _row(params: dict, tokens_per_s: float, device: str) -> tuple:
    model = {k: params.get(f"model.{k}") for k in MODEL_KEYS}
    if any(v is None for v in model.values()):
        return ("{}", 0.0, 0, device)
    for k in ("n_embd", "n_layer", "vocab_size"):
        model[k] = int(model[k])
    model["bias"] = str(model["bias"]).lower() == "true"
    return (json.dumps(model), float(tokens_per_s), int(params.get("seq.len") or 0), device)


# ---- bln-sweep calibrate ----------------------------------------------------------------------


def calibrate(plan, cell_configs: list, steps: int = 3) -> dict[str, dict]:
    """Time `steps` optimizer steps (after one warm-up step) of each distinct cell shape on this
    machine. Returns {shape key: measurement}."""
    from bln_sweeps.build import pick_device

    out: dict[str, dict] = {}
    for cfg in cell_configs:
        device = pick_device(cfg)
        key = shape_key(cfg, device.type)
        if key not in out:
            out[key] = time_steps(cfg, device, steps)
    return out


def time_steps(cfg: Any, device, steps: int) -> dict:
    """Forward, backward and AdamW on random tokens, one micro-batch per step, bf16 autocast on
    CUDA as training uses."""
    import torch

    from bln_sweeps.build import build_model

    model = build_model(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, cfg.model.vocab_size, (cfg.batch.size, cfg.seq.len), device=device)
    cuda = device.type == "cuda"

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            _, loss = model(x, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocator, kernels, lazy init
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    tokens_per_s = cfg.batch.size * cfg.seq.len * steps / (time.perf_counter() - t0)
    return {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "tokens_per_s": tokens_per_s,
        "flops_per_s": tokens_per_s * flops_per_token(cfg.model, cfg.seq.len),
        "measured": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def save_calibration(sweeps_dir: Path, results: dict[str, dict]) -> Path:
    path = Path(sweeps_dir) / CALIBRATION
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = {**load_calibration(sweeps_dir), **results}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(merged, indent=2))
    tmp.replace(path)
    return path


def print_cost(plan, per_cell: bool, uri: str | None = None) -> None:
    """The compute estimate; --dry-run shows it per cell."""
    from launchers.prepare import tracking_uri

    if uri is None:
        try:
            uri = tracking_uri(plan)
        except ValueError:
            uri = None  # a bad tracking.uri fails later, where the run needs it
    est = estimate(plan, plan.cell_configs, plan.sweeps_dir, uri)
    print("\n".join(render(est, per_cell)))
