"""What a run is called: its key (the checkpoint directory and the `run_key` tag that resume
matches on), its MLflow params, and its MLflow run name. All three are read off the RunConfig.

    run_key(cfg)    # "3f9a0c21be47": every setting that changes the numbers, hashed
    params_of(cfg)  # the resolved config as a nested dict (flattened by the tracking contract)
    run_name(cfg)   # "bln · b16 · s2048" unless tracking.run_name says otherwise

Torch-free.
"""

import hashlib
import json
from dataclasses import asdict

from bln_sweeps.config import RunConfig


def run_key(cfg: RunConfig) -> str:
    """Identity of a run for resuming: every setting that changes the numbers."""
    d = asdict(cfg)
    d.pop("tracking")
    for k in ("out_dir", "resume", "checkpoint_interval", "log_interval"):
        d["train"].pop(k)
    d["train"].pop("activation_checkpointing")  # memory for time; the same numbers
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def params_of(cfg: RunConfig) -> dict:
    """The resolved config as MLflow params: everything but where the params themselves go."""
    d = asdict(cfg)
    d.pop("tracking")
    return d


def run_name(cfg: RunConfig) -> str:
    return cfg.tracking.run_name or f"{cfg.norm.name} · b{cfg.batch.size} · s{cfg.seq.len}"
