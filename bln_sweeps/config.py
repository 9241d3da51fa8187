"""Run-config schemas and validation. Torch-free: login nodes import it.

Each config group in `conf/` fills one field of `RunConfig` with the same name (`conf/norm/*.yaml`
fills `RunConfig.norm`, ...). The schemas below are registered in Hydra's ConfigStore as
`<group>/base` (bln_sweeps.compose), and every group YAML starts from its schema, so a misspelled
key fails when Hydra composes. `to_run_config` converts the composed DictConfig to dataclasses
once, at the entry point; `validate` then checks what a schema cannot (cross-field rules) and
raises `ConfigError`, which every CLI prints as one line and exit code 2.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from bln_sweeps.tracking.contract import VAL_LOSS

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# Norms whose train-mode statistics pool over the batch: they cannot train on one token.
BATCH_STAT_NORMS = ("batchnorm", "causal_batchnorm", "bln", "powernorm")

# Norm sites of the model: inputs of attention (ln_1) and MLP (ln_2), the final norm (ln_f), and
# with model.norm_placement=peri the sub-layers' output norms (ln_1_out, ln_2_out).
NORM_SITES = ("ln_1", "ln_2", "ln_f", "ln_1_out", "ln_2_out")
QK_NORMS = ("none", "rmsnorm", "layernorm")  # model.qk_norm: per-head norm of q and k
NORM_PLACEMENTS = ("pre", "peri")  # model.norm_placement: pre-norm (GPT-2) or Peri-LN


class ConfigError(ValueError):
    """Bad user input: names the key, the value and the valid choices."""

    def __init__(self, key: str, value: Any, expected: str):
        self.key, self.value, self.expected = key, value, expected
        super().__init__(f"{key}={value!r}: {expected}")


@dataclass
class ModelConfig:
    name: str = "tiny"  # flavour: a YAML stem of conf/model/ (the only list of flavours)
    block_size: int = 256  # longest sequence (rows of the position embedding)
    vocab_size: int = 512
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm (GPT-2 has them)
    qk_norm: str = "none"  # none | rmsnorm | layernorm: q and k normalised per head before SDPA
    norm_placement: str = "pre"  # pre (GPT-2) | peri (Peri-LN: a norm on each sub-layer output too)


@dataclass
class NormConfig:
    name: str = "layernorm"  # registry key used at ln_1 and ln_2 (= YAML stem = MLflow norm.name)
    final: str | None = None  # registry key at ln_f; None = same as `name` (with its options)
    options: dict[str, Any] = field(default_factory=dict)  # keyword options of build_norm
    # per-site overrides, site -> options (and optionally `name`, another variant at that site);
    # sites are NORM_SITES; a site not listed uses `name`/`options` (ln_f: `final`)
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class BatchConfig:
    size: int = 8  # micro-batch in sequences: the sample batch-statistic norms see (BLN's m)
    tokens_per_step: int | None = None  # tokens per optimizer step; None = one micro-batch


@dataclass
class SeqConfig:
    len: int = 128  # tokens per sequence


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 6e-4  # peak learning rate (nanoGPT / llm.c 124M)
    min_lr_frac: float = 0.1  # cosine floor as a fraction of lr (6e-5 / 6e-4)
    warmup_frac: float = 0.04  # linear warm-up as a fraction of train.steps (llm.c: 700 / 18,865)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # on >= 2-D weights only
    grad_clip: float = 1.0  # max global grad norm; 0 = off


@dataclass
class DataConfig:
    name: str = "synthetic"  # synthetic (generated in memory) | tokens (uint16 shards)
    path: str | None = None  # shard directory for data=tokens
    vocab_size: int = 512  # synthetic corpus vocabulary
    n_train_tokens: int = 2_000_000  # synthetic corpus size
    n_val_tokens: int = 200_000
    seed: int = 1234  # corpus seed: the same data for every run, whatever the run's seed


@dataclass
class TrainConfig:
    steps: int = 200  # optimizer steps
    eval_interval: int = 50  # steps between evaluations (and always at the end)
    log_interval: int = 10  # steps between train-metric logs
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16
    compile: bool = False  # torch.compile the training forward (CPU or CUDA); eval stays eager
    activation_checkpointing: bool = False  # recompute each block's attention and MLP in backward
    checkpoint_interval: int = 100  # steps between periodic checkpoints; 0 = only at end/signal
    out_dir: str = "runs"  # checkpoints live in <out_dir>/<run key>/
    resume: bool = True  # continue from a checkpoint of the same config when one exists
    diverge_loss: float = 0.0  # stop as diverged when train loss exceeds this; 0 = 2 * ln(vocab)
    fault: str | None = None  # tests only: raise@STEP / oom@STEP make optimizer step STEP fail


@dataclass
class EvalConfig:
    # Tokens in each evaluation split (val: selection, test: reporting): eval.tokens // seq.len
    # fixed windows, the same for every cell whatever its batch size.
    tokens: int = 8192
    batch_stats: bool = True  # also report val/loss@batch (train-mode statistics, leak diagnostic)
    bln_switches: list[str] = field(default_factory=list)  # e.g. [TTFF, FFFF] or [all]


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str | None = None  # None = sqlite:///<cwd>/mlflow.db (embedded, no server)
    experiment: str = "bln-train"
    run_name: str | None = None  # None = built from the config (e.g. "bln · b16 · s2048")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    norm: NormConfig = field(default_factory=NormConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    seq: SeqConfig = field(default_factory=SeqConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    seed: int = 0

    @property
    def grad_accum(self) -> int:
        """Micro-batches per optimizer step (validated to divide exactly)."""
        if self.batch.tokens_per_step is None:
            return 1
        return self.batch.tokens_per_step // (self.batch.size * self.seq.len)

    @property
    def warmup_steps(self) -> int:
        return round(self.optim.warmup_frac * self.train.steps)


GROUPS = {
    "model": ModelConfig,
    "norm": NormConfig,
    "batch": BatchConfig,
    "seq": SeqConfig,
    "optim": OptimConfig,
    "data": DataConfig,
    "tracking": TrackingConfig,
}


def group_options(group: str) -> list[str]:
    """The YAML stems of a config group: the valid values of `<group>=...`."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def to_run_config(cfg: Any) -> RunConfig:
    """DictConfig (composed by Hydra) -> RunConfig, resolving interpolations. Extra root keys such
    as `hydra` or a sweep's own sections are dropped."""
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(cfg, resolve=True)
    known = {k: _literal(v) for k, v in data.items() if k in RunConfig.__dataclass_fields__}
    merged = OmegaConf.merge(OmegaConf.structured(RunConfig), known)
    return OmegaConf.to_object(merged)


def _literal(value: Any) -> Any:
    """Resolved values, escaped so the second pass through OmegaConf keeps a `${...}` that came
    from a value (e.g. a quoted override) as text instead of resolving it."""
    if isinstance(value, str):
        return value.replace("${", "\\${")
    if isinstance(value, dict):
        return {k: _literal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_literal(v) for v in value]
    return value


def _positive(key: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):  # inf would pass `> 0` and train on nan
        raise ConfigError(key, value, "must be a finite number > 0")


def validate(cfg: RunConfig) -> RunConfig:
    """Cross-field rules no schema can express. Raises ConfigError naming the first bad key (the
    checks run in this order, so which key is named first does not depend on how they are split)."""
    norms = group_options("norm")
    _check_names(cfg, norms)
    _check_shapes(cfg)
    _check_norm_sites(cfg, norms)
    _check_optim(cfg)
    _check_data_and_device(cfg)
    return cfg


def _check_names(cfg: RunConfig, norms: list[str]) -> None:
    for key, name in (("norm.name", cfg.norm.name), ("norm.final", cfg.norm.final)):
        if name is not None and name not in norms:
            raise ConfigError(key, name, f"valid choices: {', '.join(norms)}")
    if cfg.model.name not in group_options("model"):
        raise ConfigError(
            "model.name", cfg.model.name, f"valid: {', '.join(group_options('model'))}"
        )


def _check_shapes(cfg: RunConfig) -> None:
    for key, value in (
        ("optim.lr", cfg.optim.lr),
        ("train.steps", cfg.train.steps),
        ("train.eval_interval", cfg.train.eval_interval),
        ("eval.tokens", cfg.eval.tokens),
        ("train.log_interval", cfg.train.log_interval),
        ("batch.size", cfg.batch.size),
        ("seq.len", cfg.seq.len),
        ("model.n_layer", cfg.model.n_layer),
        ("model.n_head", cfg.model.n_head),  # before `n_embd % n_head` divides by it
        ("model.n_embd", cfg.model.n_embd),
    ):
        _positive(key, value)
    if cfg.model.n_embd % cfg.model.n_head:
        raise ConfigError(
            "model.n_head", cfg.model.n_head, f"must divide n_embd {cfg.model.n_embd}"
        )
    if cfg.seq.len > cfg.model.block_size:
        raise ConfigError(
            "seq.len",
            cfg.seq.len,
            f"exceeds the model's position limit model.block_size={cfg.model.block_size}",
        )
    if cfg.seq.len < 2:
        raise ConfigError("seq.len", cfg.seq.len, "must be >= 2")
    for key, value, choices in (
        ("model.qk_norm", cfg.model.qk_norm, QK_NORMS),
        ("model.norm_placement", cfg.model.norm_placement, NORM_PLACEMENTS),
    ):
        if value not in choices:
            raise ConfigError(key, value, f"valid choices: {', '.join(choices)}")


def _check_norm_sites(cfg: RunConfig, norms: list[str]) -> None:
    for site, opts in cfg.norm.sites.items():
        if site not in NORM_SITES:
            raise ConfigError(f"norm.sites.{site}", opts, f"valid sites: {', '.join(NORM_SITES)}")
        name = (opts or {}).get("name")
        if name is not None and name not in norms:
            raise ConfigError(f"norm.sites.{site}.name", name, f"valid choices: {', '.join(norms)}")
    site_names = {(o or {}).get("name") for o in cfg.norm.sites.values()} - {None}
    uses_batch = {cfg.norm.name, cfg.norm.final or cfg.norm.name, *site_names} & set(
        BATCH_STAT_NORMS
    )
    if uses_batch and cfg.batch.size * cfg.seq.len < 2:
        raise ConfigError(
            "batch.size", cfg.batch.size, f"{sorted(uses_batch)[0]} needs more than one token"
        )
    micro = cfg.batch.size * cfg.seq.len
    tps = cfg.batch.tokens_per_step
    if tps is not None and (tps <= 0 or tps % micro):
        raise ConfigError(
            "batch.tokens_per_step",
            tps,
            f"must be a positive multiple of batch.size * seq.len = {micro}",
        )


def _check_optim(cfg: RunConfig) -> None:
    if not 0 <= cfg.optim.warmup_frac < 1:
        raise ConfigError("optim.warmup_frac", cfg.optim.warmup_frac, "must be in [0, 1)")
    if not 0 <= cfg.optim.min_lr_frac <= 1:
        raise ConfigError("optim.min_lr_frac", cfg.optim.min_lr_frac, "must be in [0, 1]")
    if cfg.optim.weight_decay < 0:
        raise ConfigError("optim.weight_decay", cfg.optim.weight_decay, "must be >= 0")


def _check_data_and_device(cfg: RunConfig) -> None:
    if cfg.data.name not in group_options("data"):
        raise ConfigError("data.name", cfg.data.name, f"valid: {', '.join(group_options('data'))}")
    if cfg.data.name == "synthetic" and cfg.data.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            "data.vocab_size",
            cfg.data.vocab_size,
            f"exceeds model.vocab_size={cfg.model.vocab_size}",
        )
    if cfg.train.dtype not in ("auto", "float32", "bfloat16"):
        raise ConfigError("train.dtype", cfg.train.dtype, "valid choices: auto, float32, bfloat16")
    from bln_sweeps.tracking import resolve_tracking_uri  # stdlib-only at import

    try:
        resolve_tracking_uri(cfg.tracking.uri, Path.cwd())
    except ValueError as e:
        raise ConfigError("tracking.uri", cfg.tracking.uri, str(e).split(": ", 1)[-1]) from None
    device = cfg.train.device
    if not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
        raise ConfigError("train.device", device, "valid choices: auto, cpu, cuda, cuda:N")
    kind, _, at = (cfg.train.fault or "raise@1").partition("@")
    if kind not in ("raise", "oom") or not at.isdigit() or int(at) < 1:
        raise ConfigError("train.fault", cfg.train.fault, "valid forms: null, raise@STEP, oom@STEP")
    for sw in cfg.eval.bln_switches:
        if sw != "all" and (len(sw) != 4 or set(sw) - {"T", "F"}):
            raise ConfigError(
                "eval.bln_switches", sw, "four letters T/F (e.g. TTFF, FFFF) or 'all'"
            )


# ---- bln-sweep: the sections a sweep adds to a run (conf/sweep.yaml) ----------------------------


@dataclass
class SweepSection:
    name: str = "default"  # the sweep's name: its MLflow experiment, studies and directory
    dir: str = "sweeps"  # the sweep directory is <dir>/<name>
    grid: dict[str, str] = field(default_factory=dict)  # axes used when the CLI gives none


@dataclass
class SearchConfig:
    n_trials: int = 8  # trials per cell (complete + pruned + failed count against it)
    confirm_seeds: int = 3  # the best trial re-run with seeds seed+1..seed+k (search: seed)
    metric: str = VAL_LOSS  # minimised; population statistics on the selection split
    sampler: str = "tpe"  # tpe | random | qmc | gp
    startup_trials: int | None = None  # random trials before TPE/GP model; None: n_trials // 3
    expand_edges: bool = False  # widen a range whose best lies at an edge, once per cell
    expand_trials: int = 4  # extra trials a widened cell gets
    pruner: str = "median"  # none | median | halving | hyperband
    pruner_warmup_evals: int = 1  # evaluations a trial reports before it may be pruned
    seed: int = 0  # sampler seed; each cell's stream is derived from it and the cell name
    params: dict[str, Any] = field(default_factory=dict)  # key -> distribution (every cell)
    per_norm: dict[str, dict[str, Any]] = field(default_factory=dict)  # norm -> extra params
    budget_hours: float | None = None  # device-hours cap on the search; None = no cap


@dataclass
class LauncherConfig:
    """Field types only. The values are conf/launcher/<name>.yaml, the one list of launcher
    defaults (read by bln-sweep through Hydra, by launchers.submit.conf_defaults elsewhere);
    MISSING here, so a launcher YAML that leaves a field out fails instead of taking a value
    from a second list."""

    name: str = MISSING  # local | slurm | debug
    workers: int = MISSING  # worker jobs; each pulls trials until the budgets are spent
    timeout_min: int = MISSING  # per worker job, always explicit (submitit's local default: 2)
    gpus_per_worker: int = MISSING  # 0 on CPU-only machines
    ranks_per_worker: int = MISSING  # DDP ranks per trial; 0 = one per GPU (gpus_per_worker), or 1
    cpus_per_worker: int = MISSING
    assumed_tflops: float | None = MISSING  # throughput per worker for --dry-run's cost estimate
    slurm: dict[str, Any] = MISSING  # submitit slurm_* parameters


@dataclass
class StorageConfig:
    name: str = "embedded"  # embedded (Optuna journal file in the sweep dir) | postgres
    url: str | None = None  # RDB URL for Optuna, e.g. postgresql://host/db


@dataclass
class SweepConfig(RunConfig):
    sweep: SweepSection = field(default_factory=SweepSection)
    search: SearchConfig = field(default_factory=SearchConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)


SWEEP_GROUPS = {"search": SearchConfig, "launcher": LauncherConfig, "storage": StorageConfig}
ALL_GROUPS = {**GROUPS, **SWEEP_GROUPS}
