"""A sweep command line -> a validated plan: cells, search spaces, budgets. Torch-free.

Comma lists (and range()/glob()) on the command line are grid axes: their Cartesian product is
the set of cells, one Optuna study each. Everything else is a plain override applied to every
trial. With no axes on the command line, `sweep.grid` in conf/sweep.yaml is the grid. Every
cell's config is composed and validated here, before anything is created or submitted.
"""

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bln_sweeps.compose import compose, expand_grid
from bln_sweeps.config import ConfigError, SweepConfig, to_run_config, validate
from bln_sweeps.sweep.space import parse_space
from bln_sweeps.tracking.contract import VAL_LOSS


@dataclass
class Plan:
    sweep: str
    sweep_dir: Path
    base_overrides: list[str]
    cells: list[dict[str, Any]]  # name, overrides, space
    search: dict[str, Any]
    launcher: dict[str, Any]
    storage_url: str | None
    base_seed: int
    axes: list[str] = field(default_factory=list)
    cell_configs: list = field(default_factory=list, repr=False)  # each cell's RunConfig

    @property
    def sweeps_dir(self) -> Path:
        return self.sweep_dir.parent

    @property
    def trial_budget(self) -> int:
        return len(self.cells) * (self.search["n_trials"] + self.search["confirm_seeds"])


def is_axis(override: str) -> bool:
    """A comma list, range() or glob() as the override's own value; not one nested in a value
    (`search.params={optim.lr: 'range(1, 5)'}` is a search space, not an axis)."""
    if len(expand_grid([override])) > 1:  # also turns an unparsable override into a ConfigError
        return True
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(override).is_sweep_override()


def sweep_config(overrides: list[str]) -> SweepConfig:
    from omegaconf import OmegaConf

    return OmegaConf.to_object(compose(overrides, "sweep"))


# One process per worker on one machine; SLURM's default MaxArraySize is 1001 (tasks 0..1000).
MAX_WORKERS = {"local": 256, "debug": 256, "slurm": 1000}


def check_limits(cfg: SweepConfig) -> None:
    """Settings no schema bounds: per-norm search spaces for norms that exist, and a number of
    workers a machine (local) or SLURM's job array limit (slurm) can hold."""
    from bln_sweeps.config import group_options

    norms = group_options("norm")
    for name in cfg.search.per_norm:
        if name not in norms:
            raise ConfigError(
                f"search.per_norm.{name}",
                cfg.search.per_norm[name],
                f"unknown norm; valid choices: {', '.join(norms)}",
            )
    most = MAX_WORKERS.get(cfg.launcher.name)
    if most is not None and cfg.launcher.workers > most:
        raise ConfigError(
            "launcher.workers",
            cfg.launcher.workers,
            f"must be <= {most} for launcher={cfg.launcher.name}",
        )


def check_settings(cfg: SweepConfig) -> None:
    """Search and launcher settings, checked before any cell is composed: budgets, worker
    counts, sampler and pruner names, the search metric."""
    s = cfg.search
    if s.n_trials < 1:
        raise ConfigError("search.n_trials", s.n_trials, "must be >= 1")
    if s.confirm_seeds < 0:
        raise ConfigError("search.confirm_seeds", s.confirm_seeds, "must be >= 0")
    if s.startup_trials is not None and s.startup_trials < 0:
        raise ConfigError("search.startup_trials", s.startup_trials, "must be >= 0 or null")
    if s.expand_trials < 0:
        raise ConfigError("search.expand_trials", s.expand_trials, "must be >= 0")
    if cfg.launcher.workers < 1:
        raise ConfigError("launcher.workers", cfg.launcher.workers, "must be >= 1")
    if cfg.launcher.timeout_min < 1:
        raise ConfigError("launcher.timeout_min", cfg.launcher.timeout_min, "must be >= 1")
    check_limits(cfg)
    for key, value in (
        ("search.budget_hours", s.budget_hours),
        ("launcher.assumed_tflops", cfg.launcher.assumed_tflops),
    ):
        if value is not None and not value > 0:
            raise ConfigError(key, value, "a positive number, or null for none")
    from bln_sweeps.sweep.space import make_pruner, make_sampler

    make_sampler(asdict(s)), make_pruner(asdict(s))  # unknown names fail here, not in a worker
    if not s.metric.startswith(VAL_LOSS):
        raise ConfigError(
            "search.metric", s.metric, "a validation loss: val/loss or val/loss@<mode>"
        )


def make_plan(overrides: list[str]) -> Plan:
    axes = [o for o in overrides if is_axis(o)]
    base = [o for o in overrides if o not in axes]
    cfg = sweep_config(base)
    if not axes:  # the default grid, less the keys the command line pins to one value
        pinned = {o.split("=", 1)[0].lstrip("+~") for o in base}
        axes = [f"{k}={v}" for k, v in cfg.sweep.grid.items() if k not in pinned]
    axis_keys = [a.split("=", 1)[0].lstrip("+") for a in axes]
    for key in axis_keys:
        if key in ("seed",):
            raise ConfigError(key, "grid", "seeds come from search.confirm_seeds, not a grid axis")
    check_settings(cfg)
    s = cfg.search
    cells, configs = [], []
    points = list(dict.fromkeys(tuple(p) for p in expand_grid(axes)))  # `a,a` is one cell
    for point in map(list, points):
        run_cfg = validate(to_run_config(compose([*base, *point], "sweep")))
        space = {**s.params, **s.per_norm.get(run_cfg.norm.name, {})}
        for key in space:
            if key in axis_keys:
                raise ConfigError(key, space[key], "is a grid axis; it cannot also be searched")
        dists = parse_space(space)
        for key, dist in dists.items():  # each searched key must exist and take its values
            ends = dist.choices if hasattr(dist, "choices") else (dist.low, dist.high)
            for value in dict.fromkeys(ends):  # every choice, not only the first
                validate(to_run_config(compose([*base, *point, f"{key}={value}"], "sweep")))
        name = ",".join(p.lstrip("+") for p in point if p.split("=", 1)[0].lstrip("+") in axis_keys)
        cells.append({"name": name or "all", "overrides": point, "space": space})
        configs.append(run_cfg)
    return Plan(
        sweep=cfg.sweep.name,
        sweep_dir=(Path(cfg.sweep.dir) / cfg.sweep.name).resolve(),
        base_overrides=base,
        cells=cells,
        search=asdict(s),
        launcher=asdict(cfg.launcher),
        storage_url=cfg.storage.url,
        base_seed=cfg.seed,
        axes=axes,
        cell_configs=configs,
    )


def print_plan(plan: Plan) -> None:
    s = plan.search
    print(f"sweep {plan.sweep!r} in {plan.sweep_dir}")
    print(f"grid axes: {' '.join(plan.axes) or '(none)'}")
    print(
        f"{len(plan.cells)} cells x ({s['n_trials']} trials + {s['confirm_seeds']} confirm seeds)"
        f" = {plan.trial_budget} runs; sampler {s['sampler']}, pruner {s['pruner']}"
    )
    print(search_design(plan))
    spaces = {
        cell["name"]: ", ".join(f"{k}={v}" for k, v in cell["space"].items())
        or "(nothing searched)"
        for cell in plan.cells
    }
    if len(plan.cells) > 1 and len(set(spaces.values())) == 1:  # one line, not one per cell
        print(f"  every cell: {next(iter(spaces.values()))}")
    else:
        for name, space in spaces.items():
            print(f"  {name}: {space}")
    n = plan.launcher["workers"]
    print(
        f"{n} worker job(s) on launcher {plan.launcher['name']!r}"
        f" (timeout {plan.launcher['timeout_min']} min each)"
    )


def search_design(plan: Plan) -> str:
    """The seeds and the start-up budget, stated: what makes the cells comparable."""
    from bln_sweeps.sweep.design import confirm_seed, search_seed, startup_trials

    s, base = plan.search, plan.base_seed
    k = s["confirm_seeds"]
    confirm = f"seeds {confirm_seed(base, 0)}..{confirm_seed(base, k - 1)}" if k else "none"
    modelled = s["sampler"] in ("tpe", "gp")
    startup = f", {startup_trials(s)} random start-up trials" if modelled else ""
    return (
        f"search trials train with seed {search_seed(base)}, confirm runs with {confirm};"
        f" one sampler stream per cell (search.seed={s['seed']}){startup}"
    )
