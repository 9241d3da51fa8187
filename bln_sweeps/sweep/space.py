"""Optuna's side of a sweep that the torch-free planner needs: search spaces in Hydra's sweep
grammar, the sampler and pruner of a cell, and the names and storage of its studies.

A search space is a mapping `dotted.key -> expression` in the grammar Hydra's Optuna sweeper
reads, so existing search files carry over:

    optim.lr: tag(log, interval(1e-4, 3e-3))    # log-uniform float
    optim.weight_decay: interval(0.0, 0.2)       # uniform float
    optim.beta2: choice(0.95, 0.99)              # categorical
    norm.options.warmup_steps: range(0, 200, 50) # stepped int 0, 50, ..., 200 (stop included)
    train.steps: int(interval(100, 400))         # uniform int
    model.n_layer: shuffle(range(2, 5))          # categorical of 2, 3, 4 (what range iterates)

`range(start, stop, step)` means what it means to Hydra's Optuna sweeper: `stop` is included.
As a grid axis on the command line it is Hydra's basic sweeper's range, which excludes `stop`.

Torch-free: the sweep driver parses and validates spaces on a login node.
"""

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bln_sweeps.config import ConfigError


def parse_distribution(key: str, expression: Any):
    """One search-space entry -> an optuna distribution. A plain value is not searched (None)."""
    import optuna.distributions as od
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    grammar = (
        "interval(a, b), tag(log, interval(a, b)), int(interval(a, b)), choice(...), range(...)"
    )
    try:
        override = OverridesParser.create().parse_override(f"{key}={expression}")
    except Exception as e:
        raise ConfigError(key, expression, f"not a distribution ({grammar}): {e}") from None
    value = override.value()
    if isinstance(value, IntervalSweep):
        log = "log" in value.tags
        low, high = value.start, value.end
        if not low < high or (log and low <= 0):
            raise ConfigError(key, expression, "needs low < high (and low > 0 on a log scale)")
        if isinstance(low, int) and isinstance(high, int):
            return od.IntDistribution(low, high, log=log)
        return od.FloatDistribution(float(low), float(high), log=log)
    if isinstance(value, RangeSweep):
        return _range_distribution(key, expression, value, override)
    if isinstance(value, ChoiceSweep):
        if not value.list:
            raise ConfigError(key, expression, "choice needs at least one value")
        return od.CategoricalDistribution(value.list)
    if override.is_sweep_override():
        raise ConfigError(key, expression, f"unsupported distribution; use {grammar}")
    return None


def _range_distribution(key: str, expression: Any, value, override):
    """range() as Hydra's Optuna sweeper reads it (a search file carries over unchanged): `stop`
    is the inclusive high of a stepped int or float distribution; shuffle(range(...)) is a
    categorical of the values the range iterates (stop excluded, as Hydra iterates it)."""
    import optuna.distributions as od
    from hydra.core.override_parser.types import Transformer

    if value.shuffle:
        return od.CategoricalDistribution(list(override.sweep_iterator(Transformer.encode)))
    start, stop, step = value.start, value.stop, value.step
    if step <= 0 or not start < stop:
        raise ConfigError(key, expression, "range needs start < stop and a positive step")
    if all(isinstance(v, int) for v in (start, stop, step)):
        return od.IntDistribution(start, stop, step=step)
    return od.FloatDistribution(float(start), float(stop), step=float(step))


def parse_space(space: Mapping[str, Any]) -> dict[str, Any]:
    """A search-space mapping -> {key: optuna distribution}; plain values are dropped (they are
    ordinary overrides, not searched)."""
    out = {}
    for key, expression in space.items():
        dist = parse_distribution(key, expression)
        if dist is not None:
            out[key] = dist
    return out


def override_value(value: Any) -> str:
    """A value as a Hydra override value that arrives verbatim: repr keeps floats exact; strings
    are single-quoted. In Hydra's quoted strings only a quote and the backslashes right before a
    quote (or the end) are escapes, so only those are doubled; `${` is escaped so OmegaConf never
    resolves an interpolation (e.g. `${oc.env:...}`) smuggled in through a value."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        value = value.replace("${", "\\${")
        body = re.sub(r"(\\*)('|$)", _escape_before_quote, value)
        return "'" + body + "'"
    return repr(value)


def _escape_before_quote(m: re.Match) -> str:
    """Backslashes before a quote or the end are doubled; the quote itself is escaped."""
    return m.group(1) * 2 + ("\\'" if m.group(2) else "")


def open_storage(url: str | None, sweep_dir: Path):
    """Embedded default: an Optuna journal file in the sweep directory (many local processes,
    no server). Otherwise an RDB URL (PostgreSQL on a cluster)."""
    import optuna

    if not url:
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(sweep_dir / "optuna.journal")))
    return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})


def make_sampler(search: Mapping[str, Any], cell: str = ""):
    """The sampler stream of one cell (bln_sweeps.sweep.design: seeded from search.seed and the
    cell, start-up trials sized by the budget)."""
    from bln_sweeps.sweep.design import cell_sampler

    return cell_sampler(search, cell)


def make_pruner(search: Mapping[str, Any]):
    import optuna

    warm = search["pruner_warmup_evals"]
    pruners = {
        "none": lambda: optuna.pruners.NopPruner(),
        "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
        "halving": lambda: optuna.pruners.SuccessiveHalvingPruner(),
        "hyperband": lambda: optuna.pruners.HyperbandPruner(),
    }
    if search["pruner"] not in pruners:
        raise ConfigError("search.pruner", search["pruner"], f"valid: {', '.join(pruners)}")
    return PatientStart(pruners[search["pruner"]](), warm)


class PatientStart:
    """Never prune before a trial has reported `evals` evaluations (then ask the inner pruner)."""

    def __init__(self, inner, evals: int):
        self.inner, self.evals = inner, evals

    def prune(self, study, trial) -> bool:
        if len(trial.intermediate_values) < self.evals:
            return False
        return self.inner.prune(study, trial)


def study_names(sweep: str, cell: str) -> tuple[str, str]:
    """(search study, confirm study) of one cell."""
    return f"{sweep}/{cell}", f"{sweep}/{cell}/confirm"
