"""Every option of every group composes and validates; bad input names the key and the choices."""

from dataclasses import asdict

import pytest
from omegaconf import OmegaConf

from bln_sweeps.compose import compose, expand_grid
from bln_sweeps.config import (
    CONF_DIR,
    ConfigError,
    group_options,
    to_run_config,
    validate,
)


def cfg_of(*overrides):
    return validate(to_run_config(compose(list(overrides))))


@pytest.mark.parametrize("group", ["model", "norm", "batch", "seq", "optim", "data", "tracking"])
def test_every_option_composes(group):
    for option in group_options(group):
        overrides = [f"{group}={option}"]
        if option == "tokens":
            continue  # needs shards; covered in test_train
        if group == "seq":
            overrides.append("model=gpt2_124m")
        cfg = to_run_config(compose(overrides))
        # every value the option's YAML sets arrives in the config (not just "something did")
        yaml = OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{option}.yaml"))
        yaml.pop("defaults", None)
        assert_sets(asdict(getattr(cfg, group)), yaml, f"{group}={option}")


def assert_sets(composed: dict, yaml: dict, where: str) -> None:
    """Every literal value of `yaml` (nested) is in `composed`; interpolations are resolved and
    checked elsewhere."""
    for key, value in yaml.items():
        if isinstance(value, dict):
            assert_sets(composed[key], value, f"{where}.{key}")
        elif not (isinstance(value, str) and "${" in value):
            assert composed[key] == value, (where, key, composed[key], value)


def test_defaults_are_the_embedded_cpu_run():
    cfg = cfg_of()
    assert (cfg.model.name, cfg.norm.name, cfg.data.name) == ("tiny", "layernorm", "synthetic")
    assert cfg.tracking.uri is None and cfg.tracking.enabled


def test_bln_batch_size_follows_batch_group():
    cfg = cfg_of("norm=bln", "batch=b16", "seq=s1024")
    assert cfg.norm.options["batch_size"] == 16 and cfg.batch.size == 16
    assert cfg.norm.options["max_len"] == cfg.model.block_size


def test_grad_accum_derived():
    cfg = cfg_of("batch=b4", "seq=s128", "batch.tokens_per_step=2048")
    assert cfg.grad_accum == 4


def test_optimizer_defaults_follow_nanogpt():
    o = cfg_of().optim
    assert (o.lr, o.beta1, o.beta2, o.weight_decay, o.grad_clip) == (6e-4, 0.9, 0.95, 0.1, 1.0)


@pytest.mark.parametrize(
    "overrides, key, hint",
    [
        (["norm=foo"], "norm", "layernorm"),
        (["model=huge"], "model", "gpt2_124m"),
        (["optim.lrr=1"], "optim.lrr", "lr"),
        (["trian.steps=3"], "trian.steps", "train"),
        (["optim.lr=abc"], "optim.lr", "type"),
        (["norm=bln", "norm.options.zetaa=1"], "norm.options.zetaa", "norm option"),
        (["seq=s4096", "model.block_size=1024"], "seq.len", "block_size"),
        (["optim.lr=0"], "optim.lr", "> 0"),
        (["optim.lr=-1e-3"], "optim.lr", "> 0"),
        (["train.steps=0"], "train.steps", "> 0"),
        (["batch=b8", "batch.tokens_per_step=1000"], "batch.tokens_per_step", "multiple"),
        (["norm.name=nope"], "norm.name", "bln"),
        (["norm.final=nope"], "norm.final", "layernorm"),
        (["eval.bln_switches=[TTXF]"], "eval.bln_switches", "T/F"),
        (["train.device=tpu"], "train.device", "cuda"),
        (["data.vocab_size=100000"], "data.vocab_size", "model.vocab_size"),
        (["model.qk_norm=l2"], "model.qk_norm", "none, rmsnorm, layernorm"),
        (["model.norm_placement=post"], "model.norm_placement", "pre, peri"),
        (["+norm.sites.ln_9.eps=1e-5"], "norm.sites.ln_9", "ln_1, ln_2, ln_f, ln_1_out, ln_2_out"),
        (["+norm.sites.ln_1.name=nope"], "norm.sites.ln_1.name", "dyt"),
    ],
)
def test_bad_input_names_key_and_choices(overrides, key, hint):
    with pytest.raises(ConfigError) as e:
        cfg_of(*overrides)
    msg = str(e.value)
    assert msg.startswith(key) and hint in msg and "\n" not in msg


def test_expand_grid_is_a_cartesian_product():
    points = expand_grid(["norm=layernorm,bln", "batch=b4,b32", "seq=s128"])
    assert len(points) == 4
    assert ["norm=bln", "batch=b32", "seq=s128"] in points


def test_expand_grid_glob_and_empty_axis():
    assert len(expand_grid(["seq=glob(s1*)"])) == 2  # s128, s1024
    with pytest.raises(ConfigError, match="empty axis"):
        expand_grid(["seq=glob(nothing*)"])


def test_expand_grid_rejects_search_distributions():
    with pytest.raises(ConfigError, match="not a grid axis"):
        expand_grid(["optim.lr=interval(1e-4,1e-3)"])


def test_config_module_is_torch_free():
    import subprocess
    import sys

    code = (
        "import sys; from bln_sweeps.compose import compose; "
        "from bln_sweeps.config import to_run_config; "
        "to_run_config(compose(['norm=bln'])); sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
