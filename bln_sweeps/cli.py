"""The `bln-train` command line: validate every grid point first, then hand over to Hydra.

    bln-train norm=bln batch=b16 seq=s2048 optim.lr=3e-4
    bln-train -m norm=layernorm,bln batch=b4,b32          # a Hydra grid, basic launcher

Hydra reports a bad override with a traceback-style message and exit code 1 (and, in a multirun,
only when it reaches the bad job). Here every combination the command line expands to is composed
and validated up front, including the norm options (by building one norm module), so bad input is
one line naming the key and the valid choices, exit code 2, before any run is created. Then the
module-level Hydra app `task` runs each point through bln_sweeps.train.run.
"""

import sys
from pathlib import Path

import hydra

from bln_sweeps.compose import compose, expand_grid, register_configs
from bln_sweeps.config import CONF_DIR, NORM_SITES, ConfigError, to_run_config, validate
from bln_sweeps.tracking.contract import VAL_LOSS

HYDRA_FLAGS_WITH_VALUE = {"--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd"}


def split_argv(argv: list[str]) -> tuple[list[str], bool, bool]:
    """(overrides, multirun, passthrough): passthrough = a Hydra flag we leave to Hydra alone."""
    overrides, multirun, passthrough, skip = [], False, False, False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("-m", "--multirun"):
            multirun = True
        elif arg in HYDRA_FLAGS_WITH_VALUE:
            passthrough, skip = True, True
        elif arg.startswith("-"):
            passthrough = True
        else:
            overrides.append(arg)
    return overrides, multirun, passthrough


def check(overrides: list[str], config_name: str = "train") -> int:
    """Compose and validate every grid point; returns the number of runs."""
    from bln_sweeps.build import norm_factory
    from bln_sweeps.data import check_data

    points = expand_grid(overrides)
    for point in points:
        cfg = validate(to_run_config(compose(point, config_name)))
        check_data(cfg)
        check_run_names(cfg, config_name)
        factory = norm_factory(cfg)
        for site in NORM_SITES:  # every site, so a bad per-site option is named here
            try:
                factory(site)
            except ValueError as e:
                own = {k: v for k, v in (cfg.norm.sites.get(site) or {}).items() if v is not None}
                if own:  # the site's own value is to blame
                    raise ConfigError(f"norm.sites.{site}", own, str(e)) from None
                raise ConfigError("norm.options", cfg.norm.name, str(e)) from None
    return len(points)


def check_run_names(cfg, config_name: str = "train") -> None:
    """What a run's names and paths must be before a run exists: an experiment name MLflow
    filters can quote, a writable out_dir (not a file; bln-train only: a sweep's runs live in
    its sweep directory), and a tracking server that answers."""
    from bln_sweeps.names import check_dir, check_name
    from bln_sweeps.tracking import check_server, resolve_tracking_uri

    check_name("tracking.experiment", cfg.tracking.experiment, path=False)
    if config_name == "train":
        check_dir("train.out_dir", cfg.train.out_dir)
    if cfg.tracking.enabled:
        uri = resolve_tracking_uri(cfg.tracking.uri, Path.cwd())
        try:
            check_server(uri)
        except ValueError as e:
            raise ConfigError("tracking.uri", cfg.tracking.uri, str(e)) from None


def train_main(argv: list[str]) -> int:
    if "--probe-leak" in argv:
        return probe_leak_main([a for a in argv if a != "--probe-leak"])
    overrides, multirun, passthrough = split_argv(argv)
    if not passthrough:
        try:
            n = check(overrides)
        except ConfigError as e:
            from bln_sweeps.credentials import mask_text

            print(f"bln-train: error: {mask_text(str(e))}", file=sys.stderr)
            return 2
        if n > 1 and not multirun:
            print("bln-train: error: comma lists need -m (multirun)", file=sys.stderr)
            return 2
    return hydra_main(argv)


def probe_leak_main(argv: list[str]) -> int:
    """`bln-train --probe-leak [overrides]`: the leak probe alone, one line per grid point (no
    training, no MLflow run). Exit 0, or 1 when a measurement contradicts a declaration."""
    from bln_sweeps.leak import probe_config

    overrides, _, passthrough = split_argv(argv)
    if passthrough:
        print("bln-train: error: --probe-leak takes config overrides only", file=sys.stderr)
        return 2
    try:
        check(overrides)
    except ConfigError as e:
        print(f"bln-train: error: {e}", file=sys.stderr)
        return 2
    mismatch = False
    for point in expand_grid(overrides):
        cfg = validate(to_run_config(compose(point)))
        report = probe_config(cfg)
        mismatch |= report.mismatch
        label = " ".join(point) or "defaults"
        print(f"[{label}] {report.line()} · {report.seconds:.3g} s")
        if report.warmup:
            print(
                f"  a norm is in its warm-up (the first {cfg.warmup_steps} steps); a run probes "
                "again when it ends"
            )
    return 1 if mismatch else 0


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def task(cfg) -> float | None:
    """One Hydra job: the composed config -> train.run, one summary line; its val/loss is the
    value Hydra's sweepers read."""
    from bln_sweeps.checkpoint import Preempted
    from bln_sweeps.train import run

    rc = validate(to_run_config(cfg))
    try:
        result = run(rc)
    except Preempted as e:
        print(f"bln-train: {e}", file=sys.stderr)
        raise SystemExit(3) from None
    except OSError as e:  # e.g. a full disk while checkpointing: the last checkpoint stands
        print(f"bln-train: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    line = " · ".join(
        f"{k} {v:.4f}" for k, v in result.items() if k.startswith("val/") and isinstance(v, float)
    )
    print(f"[{rc.norm.name} b{rc.batch.size} s{rc.seq.len}] {result['status']} · {line}")
    if result.get("status_reason"):
        print(f"  reason: {result['status_reason']}")
    return result.get(VAL_LOSS)


def hydra_main(argv: list[str]) -> int:
    register_configs()
    sys.argv = [sys.argv[0], *hide_url_passwords(argv)]
    task()
    return 0


def hide_url_passwords(argv: list[str]) -> list[str]:
    """Hydra writes every override to `outputs/.../.hydra/` (overrides.yaml, config.yaml,
    hydra.yaml). An override whose value holds a URL password is handed to Hydra as
    `${oc.env:BLN_URL_SECRET_<n>}` instead, the real value in that environment variable (this
    process and the jobs it starts inherit it; provenance never reads *SECRET* variables), so
    the run resolves the real URL and Hydra's files only ever see the interpolation."""
    import os

    from bln_sweeps.credentials import mask_text

    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and not arg.startswith("-") and mask_text(value) != value:
            name = f"BLN_URL_SECRET_{len(out)}"
            os.environ[name] = value.strip("'\"")
            arg = f"{key}=${{oc.env:{name}}}"
        out.append(arg)
    return out


def main() -> None:
    """The `bln-train` console script."""
    sys.exit(train_main(sys.argv[1:]))


if __name__ == "__main__":
    main()
