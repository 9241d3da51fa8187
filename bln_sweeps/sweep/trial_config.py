"""A trial's config: the sweep's overrides, its cell's grid point, the sampled params and the seed,
composed by Hydra and validated, as `bln-train` would compose them from the same overrides."""

from collections.abc import Mapping
from typing import Any

from bln_sweeps.sweep.space import override_value


def trial_overrides(manifest, cell, params: Mapping[str, Any], seed: int) -> list[str]:
    """The composed config of one trial: cell grid point + sampled params + seed + tracking.
    `manifest` and `cell` are read by key: a Manifest or the plain JSON of one."""
    return [
        *manifest["base_overrides"],
        *cell["overrides"],
        *(f"{k}={override_value(v)}" for k, v in params.items()),
        f"seed={seed}",
        f"tracking.uri={override_value(manifest['tracking_uri'])}",
        f"tracking.experiment={override_value(manifest['sweep'])}",
    ]


class TrialConfigs:
    """A worker's trial configs, composing each (cell, seed) once."""

    def __init__(self, manifest):
        self.manifest = manifest
        self._composed: dict[tuple[str, int], Any] = {}  # (cell, seed) -> composed tree

    def config(self, cell, params: Mapping[str, Any], seed: int):
        """The validated RunConfig of one trial: what composing `trial_overrides(...)` gives.

        Hydra composes a cell once per seed (a compose costs a good part of a second) and the
        sampled values are set on a copy, as their overrides would set them. A searched key
        that is not a plain value of the composed tree (a config group such as `batch`) takes
        the full compose."""
        import copy

        from omegaconf import OmegaConf

        from bln_sweeps.compose import compose
        from bln_sweeps.config import ALL_GROUPS, to_run_config, validate

        def leaf(tree, key: str) -> bool:
            value = OmegaConf.select(tree, key, default=KeyError)
            return (
                key not in ALL_GROUPS and value is not KeyError and not OmegaConf.is_config(value)
            )

        key = (cell["name"], seed)
        if key not in self._composed:
            overrides = trial_overrides(self.manifest, cell, {}, seed)
            self._composed[key] = compose(overrides, "sweep")
        base = self._composed[key]
        if all(leaf(base, k) for k in params):
            tree = copy.deepcopy(base)
            for k, v in params.items():
                OmegaConf.update(tree, k, v, merge=False)
        else:
            tree = compose(trial_overrides(self.manifest, cell, params, seed), "sweep")
        return validate(to_run_config(tree))
