"""Hydra composition of run and sweep configs: the ConfigStore registration, `compose`, grid
expansion, and Hydra's errors reduced to one-line ConfigErrors. Torch-free: login nodes import it.

The schemas themselves live in bln_sweeps.config; this module knows how Hydra turns
`conf/<config_name>.yaml` plus command-line overrides into a DictConfig, and what to tell a person
when it cannot (the key, the bad value, the valid choices).
"""

from typing import Any

from bln_sweeps.config import (
    ALL_GROUPS,
    CONF_DIR,
    ConfigError,
    RunConfig,
    SweepConfig,
    group_options,
)


def register_configs() -> None:
    """Register the schemas so `conf/<group>/*.yaml` can start from `defaults: [base]`."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    cs.store(name="sweep_schema", node=SweepConfig)
    for group, schema in ALL_GROUPS.items():
        cs.store(group=group, name="base", node=schema)


def _hydra_launcher_keys(name: str | None) -> list[str]:
    """Keys of the Hydra launcher `name` as registered in Hydra's ConfigStore."""
    from hydra.core.config_store import ConfigStore

    try:
        node = ConfigStore.instance().load(f"hydra/launcher/{name or 'basic'}.yaml").node
    except Exception:
        return []
    return sorted(k for k in node if k != "_target_")


def _schema_keys(
    key: str, config_name: str = "train", launcher: str | None = None
) -> tuple[str, list[str]]:
    """(deepest valid parent, its valid child keys) of a dotted config path, for error messages.
    `launcher.slurm` is a free mapping in the schema: its keys are those of conf/launcher/
    slurm.yaml (every SLURM parameter the launcher passes on)."""
    if key.startswith(("launcher.slurm.", "hydra.launcher.slurm.")):
        from omegaconf import OmegaConf

        slurm = OmegaConf.load(CONF_DIR / "launcher" / "slurm.yaml").get("slurm") or {}
        return key.rsplit(".", 1)[0], sorted(slurm)
    if key.startswith("hydra.launcher."):  # bln-train -m hydra/launcher=<name>: its schema
        return "hydra.launcher", _hydra_launcher_keys(launcher)
    node: Any = SweepConfig if config_name == "sweep" else RunConfig
    parent = []
    for part in key.split(".")[:-1]:
        fields = getattr(node, "__dataclass_fields__", {})
        if part not in fields:
            break
        node = ALL_GROUPS.get(part, fields[part].type)
        parent.append(part)
    return ".".join(parent) or "top level", sorted(getattr(node, "__dataclass_fields__", {}))


def _norm_options(overrides: list[str]) -> list[str]:
    """Option names of the norm chosen on the command line (its YAML is the list of options)."""
    from omegaconf import OmegaConf

    name = next((o.split("=", 1)[1] for o in overrides if o.startswith("norm=")), "layernorm")
    path = CONF_DIR / "norm" / f"{name}.yaml"
    return sorted(OmegaConf.load(path).get("options") or {}) if path.exists() else []


def _explain(
    override: str, err: Exception, overrides: list[str], config_name: str = "train"
) -> ConfigError:
    """Hydra's composition errors, reduced to one line naming the key and the valid choices."""
    from hydra.errors import MissingConfigException

    key, _, value = override.lstrip("+~").partition("=")
    chain, e = [], err
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    text = " | ".join(chain)
    # the innermost message that says something (some of Hydra's are empty)
    last = next((c.strip() for c in reversed(chain) if c.strip()), type(err).__name__)
    if isinstance(err, MissingConfigException) and key in ALL_GROUPS:
        return ConfigError(
            key, value, f"unknown option; valid choices: {', '.join(group_options(key))}"
        )
    if "not in struct" in text or ("Could not override" in text and "Key '" in text):
        if key.startswith("norm.options."):
            valid = ", ".join(_norm_options(overrides)) or "none"
            return ConfigError(key, value, f"unknown norm option; valid options: {valid}")
        chosen = [o.split("=", 1)[1] for o in overrides if o.startswith("hydra/launcher=")]
        parent, valid = _schema_keys(key, config_name, chosen[-1] if chosen else None)
        return ConfigError(key, value, f"unknown key; valid keys of {parent}: {', '.join(valid)}")
    if "could not be converted" in text or "Value '" in text:
        return ConfigError(key, value, "wrong type: " + last.splitlines()[0])
    return ConfigError(key, value, last.splitlines()[0])


def compose(overrides: list[str], config_name: str = "train") -> Any:
    """Compose `conf/<config_name>.yaml` with overrides; errors become one-line ConfigErrors."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    for ov in overrides:  # an unknown group option is clearest when caught before Hydra's message
        key, _, value = ov.partition("=")
        if len(value) > 1 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]  # a quoted option name, as searched values are passed
        if key in ALL_GROUPS and value and "," not in value and "(" not in value:
            if value not in group_options(key):
                raise ConfigError(key, value, f"valid choices: {', '.join(group_options(key))}")
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        try:
            return hydra_compose(config_name, overrides=overrides)
        except Exception as e:
            bad = _guilty_override(overrides, config_name)
            raise _explain(bad, e, overrides, config_name) from None


def _guilty_override(overrides: list[str], config_name: str) -> str:
    """The first override that fails on its own (Hydra's message does not always say)."""
    from hydra import compose as hydra_compose

    for ov in overrides:
        try:
            hydra_compose(config_name, overrides=[ov])
        except Exception:
            return ov
    return overrides[-1] if overrides else ""


def _parse_overrides(overrides: list[str]) -> list:
    """Hydra's parsed overrides; one that its grammar rejects (e.g. a look-alike letter from
    another alphabet in `norm=layernorm`) is a ConfigError naming it, not a lexer traceback."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    parsed = []
    for ov in overrides:
        try:
            parsed.extend(parser.parse_overrides([ov]))
        except Exception as e:
            key, _, value = ov.partition("=")
            odd = sorted({c for c in ov if not c.isascii()})
            why = f"non-ASCII {''.join(odd)!r}" if odd else str(e).strip().splitlines()[0]
            key = key.lstrip("+~")
            valid = (
                f"valid choices: {', '.join(group_options(key))}"
                if key in ALL_GROUPS
                else "write it as key=value, quoting values with spaces or special characters"
            )
            raise ConfigError(key, value, f"cannot be parsed ({why}); {valid}") from None
    return parsed


def expand_grid(overrides: list[str]) -> list[list[str]]:
    """Hydra sweep syntax -> the list of plain override lists, one per grid point (Cartesian
    product, in command-line order, like Hydra's basic sweeper). Comma lists, range() and glob()
    expand; a searched distribution (interval, tag) is not a grid axis and is rejected here."""
    import itertools

    from hydra.core.override_parser.types import Glob

    axes = []
    for ov in _parse_overrides(overrides):
        key = ov.get_key_element()
        if not ov.is_sweep_override():
            axes.append([ov.input_line])
            continue
        if isinstance(ov.value(), Glob):
            values = ov.value().filter(group_options(ov.key_or_group))
        else:
            try:
                values = list(ov.sweep_string_iterator())
            except Exception as e:
                raise ConfigError(ov.key_or_group, ov.input_line, f"not a grid axis: {e}") from None
        if not values:
            raise ConfigError(ov.key_or_group, ov.input_line, "empty axis")
        axes.append([f"{key}={v}" for v in values])
    return [list(p) for p in itertools.product(*axes)]
