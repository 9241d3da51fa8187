"""The registry of norm variants. A new variant is one class (in its family's module), one line
here, and one YAML in conf/norm/ (a test checks the keys equal the YAML stems)."""

import inspect

import torch.nn as nn

from bln_sweeps.norms.batchnorm import BatchNorm, CausalBatchNorm
from bln_sweeps.norms.bln import BatchLayerNorm
from bln_sweeps.norms.options import check_int
from bln_sweeps.norms.per_token import DyT, Identity, LayerNorm, RMSNorm
from bln_sweeps.norms.powernorm import PowerNorm

# the registry: key = conf/norm/<key>.yaml stem = MLflow norm.name

NORMS: dict[str, type[nn.Module]] = {
    "layernorm": LayerNorm,
    "rmsnorm": RMSNorm,
    "identity": Identity,
    "dyt": DyT,
    "batchnorm": BatchNorm,
    "bln": BatchLayerNorm,
    "powernorm": PowerNorm,
    "causal_batchnorm": CausalBatchNorm,
}


def build_norm(name: str, dim: int, **options) -> nn.Module:
    """A fresh norm module of width `dim`; options are the class's keyword arguments."""
    if name not in NORMS:
        raise ValueError(f"unknown norm {name!r}; valid choices: {', '.join(sorted(NORMS))}")
    cls = NORMS[name]
    params = {
        p.name: p for p in inspect.signature(cls).parameters.values() if p.kind is p.KEYWORD_ONLY
    }
    valid = ", ".join(params) or "none"
    for key in options:
        if key not in params:
            raise ValueError(f"unknown option {key!r} for norm {name!r}; valid options: {valid}")
    for key, p in params.items():
        if p.default is p.empty and key not in options:
            raise ValueError(f"norm {name!r} needs option {key!r}; valid options: {valid}")
    check_int("dim", dim, 1)
    return cls(dim, **options)
