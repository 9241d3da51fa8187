"""The search design that keeps a sweep's tables honest: sampler streams, the start-up budget,
fresh confirm seeds, and best values on the edge of their range. Torch-free.

- **Start-up trials follow the budget.** TPE and GP sample at random for their first
  `startup_trials(search)` trials, `min(10, max(2, n_trials // 3))` unless `search.startup_trials`
  says otherwise, so a small sweep still does model-based search (Optuna's default, 10, would make
  a 5-trial sweep pure random sampling).
- **One stream per cell.** A cell's sampler is seeded from (`search.seed`, cell name) and reseeded
  per trial from (`search.seed`, cell name, trial number): stable across reruns and workers (any
  worker that asks trial 7 of a cell draws the same values given the same history), and two cells
  never try the same random values by construction. QMC keeps one sequence per cell (its points
  are numbered by the study, so workers never repeat one).
- **Confirm seeds are fresh.** Every search trial trains with the sweep's `seed` (s); the k
  confirm runs use s + 1 ... s + k. The two sets are disjoint by construction, so no confirm run
  repeats the trial that was selected for being best (the winner's curse).
- **Edges.** A best value in the outer tenth of its range (in log space for a log range) is an
  unfinished comparison: `edges` finds it, `widen` extends such a range three-fold past the edge.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution
from optuna.samplers import BaseSampler

from bln_sweeps.config import ConfigError

SAMPLERS = ("tpe", "random", "qmc", "gp")
EDGE_FRACTION = 0.1  # the outer tenth of a range, on each side
WIDEN = 3.0  # an edge range grows three-fold past the edge it touched


def startup_trials(search: Mapping[str, Any]) -> int:
    """Random trials before TPE/GP model the results: `search.startup_trials`, else a third of the
    budget, at least 2 and at most Optuna's default of 10."""
    given = search.get("startup_trials")
    if given is not None:
        if given < 0:
            raise ConfigError("search.startup_trials", given, "must be >= 0 (or null: automatic)")
        return int(given)
    return min(10, max(2, int(search["n_trials"]) // 3))


def stream_seed(seed: int, cell: str, trial: int | None = None) -> int:
    """A 32-bit seed from (search seed, cell, trial number): a hash, so neighbouring cells or
    trials get unrelated streams and the same inputs always give the same seed."""
    key = json.dumps([int(seed), str(cell)] + ([] if trial is None else [int(trial)]))
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")


def build_sampler(name: str, seed: int, n_startup: int) -> BaseSampler:
    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(
            seed=seed, multivariate=True, n_startup_trials=n_startup
        ),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "qmc": lambda: optuna.samplers.QMCSampler(
            seed=seed, scramble=True, warn_asynchronous_seeding=False
        ),
        "gp": lambda: optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup),
    }
    if name not in samplers:
        raise ConfigError("search.sampler", name, f"valid: {', '.join(samplers)}")
    with warnings.catch_warnings():  # QMC is "experimental" in Optuna: said once, in the docs
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return samplers[name]()


class CellSampler(BaseSampler):
    """A cell's sampler stream: the chosen sampler, rebuilt before every trial with a seed derived
    from (search seed, cell, trial number). Everything else is delegated."""

    def __init__(self, name: str, seed: int, cell: str, n_startup: int):
        self.name, self.seed, self.cell, self.n_startup = name, seed, cell, n_startup
        self.inner = build_sampler(name, stream_seed(seed, cell), n_startup)

    def before_trial(self, study, trial) -> None:
        if self.name != "qmc":  # QMC numbers its points through the study: one sequence per cell
            self.inner = build_sampler(
                self.name, stream_seed(self.seed, self.cell, trial.number), self.n_startup
            )
        self.inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self.inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self.inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()


def cell_sampler(search: Mapping[str, Any], cell: str) -> CellSampler:
    return CellSampler(search["sampler"], int(search["seed"]), cell, startup_trials(search))


# ---- seeds ------------------------------------------------------------------------------------


def search_seed(base_seed: int) -> int:
    """The seed every search trial trains with (model init and batch order)."""
    return base_seed


def confirm_seed(base_seed: int, index: int) -> int:
    """The seed of the index-th confirm run (0-based): base + 1 + index, never the search seed."""
    return base_seed + 1 + index


# ---- edges ------------------------------------------------------------------------------------


def _position(dist: BaseDistribution, value: float) -> float:
    """Where `value` lies in the range of `dist`, 0 (low) to 1 (high), in log space for a log
    range."""
    low, high, v = float(dist.low), float(dist.high), float(value)
    if dist.log:
        low, high, v = math.log(low), math.log(high), math.log(v)
    return 0.5 if high == low else (v - low) / (high - low)


def edge_of(dist: BaseDistribution, value: Any) -> str | None:
    """`low` or `high` when a numeric value lies in the outer tenth of its range; else None
    (categorical and single-valued ranges have no edge)."""
    if not isinstance(dist, FloatDistribution | IntDistribution) or dist.low == dist.high:
        return None
    pos = _position(dist, value)
    if pos <= EDGE_FRACTION:
        return "low"
    if pos >= 1 - EDGE_FRACTION:
        return "high"
    return None


def edges(space: Mapping[str, BaseDistribution], params: Mapping[str, Any]) -> dict[str, str]:
    """{key: "low" | "high"} for every searched numeric param of `params` at an edge of `space`."""
    out = {}
    for key, dist in space.items():
        if key in params:
            edge = edge_of(dist, params[key])
            if edge:
                out[key] = edge
    return out


def edge_text(found: Mapping[str, str]) -> str:
    """The table's `at_edge` value: `optim.lr:high`, several joined by `, `; "" when none."""
    return ", ".join(f"{k}:{v}" for k, v in sorted(found.items()))


def widen(dist: BaseDistribution, edge: str) -> BaseDistribution:
    """The range extended three-fold past `edge`: on a log range the edge value is multiplied
    (high) or divided (low) by 3; on a linear range it moves out by twice the range's width, so
    the width triples. A range that starts at 0 or above stays non-negative; ints stay ints;
    float ends keep 3 significant digits."""
    low, high = float(dist.low), float(dist.high)
    if dist.log:
        low, high = (low / WIDEN, high) if edge == "low" else (low, high * WIDEN)
    else:
        width = (WIDEN - 1) * (high - low)
        low, high = (low - width, high) if edge == "low" else (low, high + width)
        if float(dist.low) >= 0:
            low = max(low, 0.0)
    if isinstance(dist, IntDistribution):
        lo, hi = math.floor(low), math.ceil(high)
        if dist.log:
            lo = max(lo, 1)
        return IntDistribution(lo, hi, log=dist.log, step=dist.step)
    if dist.step is None:  # 3 significant digits: the range used is the one the sweep prints
        low, high = float(f"{low:.3g}"), float(f"{high:.3g}")
    return FloatDistribution(low, high, log=dist.log, step=dist.step)


def expression(dist: BaseDistribution) -> str:
    """A numeric distribution in the Hydra sweeper grammar our search files use."""
    lo, hi = dist.low, dist.high
    if isinstance(dist, FloatDistribution):
        lo, hi = f"{lo:.3g}", f"{hi:.3g}"
    inner = f"interval({lo}, {hi})"
    if isinstance(dist, IntDistribution):
        inner = f"int({inner})"
    return f"tag(log, {inner})" if dist.log else inner


def to_json(dist: BaseDistribution) -> str:
    return optuna.distributions.distribution_to_json(dist)


def from_json(text: str) -> BaseDistribution:
    return optuna.distributions.json_to_distribution(text)


# ---- a sweep's spaces and their edges -----------------------------------------------------------


def searched_space(cell, study) -> dict[str, Any]:
    """A cell's distributions: its search space, with the ranges search.expand_edges widened (a
    study user attribute, {key: distribution JSON}). `cell` is read by key (a manifest Cell or
    its plain JSON)."""
    from bln_sweeps.sweep.space import parse_space

    space = parse_space(cell["space"])
    for key, text in (study.user_attrs.get("expanded") or {}).items():
        space[key] = from_json(text)
    return space


def widened_space(space: dict[str, Any], study) -> dict[str, str]:
    """{key: widened distribution JSON} for every range whose best value is at an edge."""
    try:
        best = study.best_trial
    except ValueError:  # nothing finished: no best, no edge
        return {}
    return {k: to_json(widen(space[k], e)) for k, e in edges(space, best.params).items()}


def edge_report(sweep_dir: Path) -> list[str]:
    """One line per cell and searched key whose best value lies in the outer tenth of its range:
    the cell, the key, the edge, and the override that widens it. Printed at the end of a sweep."""
    from bln_sweeps.sweep.manifest import WORKER_KEYS, load_manifest
    from bln_sweeps.sweep.space import open_storage, study_names

    manifest = load_manifest(sweep_dir, require=WORKER_KEYS)
    storage = open_storage(manifest.storage_url, Path(sweep_dir))
    lines = []
    for cell in manifest.cells:
        name = study_names(manifest.sweep, cell.name)[0]
        study = optuna.load_study(study_name=name, storage=storage)
        space = searched_space(cell, study)
        try:
            best = study.best_trial
        except ValueError:
            continue
        for key, edge in edges(space, best.params).items():
            wider = f"{{{key}: '{expression(widen(space[key], edge))}'}}"
            where = _space_entry(manifest, cell, key)
            lines.append(
                f"at edge: {cell.name}: best {key}={best.params[key]:.4g} lies in the {edge}"
                f' tenth of {expression(space[key])}; widen it: "{where}={wider}"'
                f" (or search.expand_edges=true)"
            )
    return lines


def _space_entry(manifest, cell, key: str) -> str:
    """The config key holding a searched key's range: search.params, or search.per_norm.<norm>
    for a norm's own addition."""
    search = manifest.search
    if key in search.get("params", {}):
        return "search.params"
    for norm, extra in search.get("per_norm", {}).items():
        if key in extra and f"norm={norm}" in [*manifest.base_overrides, *cell.overrides]:
            return f"search.per_norm.{norm}"
    return "search.params"
