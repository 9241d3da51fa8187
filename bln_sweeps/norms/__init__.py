"""The normalization layers under comparison, and their registry.

Every variant is an `nn.Module` built as `build_norm(name, dim, **options)` with one interface:

    y = norm(x, pad_mask=None)    # x (B, T, C); pad_mask (B, T) bool, True = padding; y (B, T, C)

and two declarations the trainer and the tests rely on:

- `causal_in_train`: does the train-mode output at position t depend only on positions <= t (of
  every sequence in the batch)? False means the layer "leaks" the future through batch statistics
  (NORMS.md §8.2), so its train-mode loss is optimistic and only the eval-mode loss is honest.
- `uses_batch_stats`: does it compute statistics over the batch (and keep running ones)?

Statistics are always computed in fp32, with autocast off, and the output is cast back to the
input dtype, so bf16 runs stay finite. Pad slots never enter a statistic; their outputs are
arbitrary and the loss must ignore them. The facts and formulas are from
`research/NORMS.md` (§3 LayerNorm, §4 RMSNorm, §5 BatchNorm, §6 BLN, §7 PowerNorm, §8.5 our
causal BatchNorm); the section numbers in the modules refer to it.

One module per family, plus what they share:

    registry.py    NORMS (key = conf/norm/<key>.yaml stem = MLflow norm.name) and build_norm
    per_token.py   layernorm, rmsnorm, identity, dyt
    batchnorm.py   batchnorm, causal_batchnorm
    bln.py         bln
    powernorm.py   powernorm
    statistics.py  fp32 statistics, sums across ranks (sync), compile path (bln_sweeps::snapshot)
    options.py     option checks (ValueError naming the key, the value and what is valid)
"""

from bln_sweeps.norms.batchnorm import BatchNorm, CausalBatchNorm
from bln_sweeps.norms.bln import BatchLayerNorm
from bln_sweeps.norms.per_token import DyT, Identity, LayerNorm, RMSNorm
from bln_sweeps.norms.powernorm import PowerNorm
from bln_sweeps.norms.registry import NORMS, build_norm
from bln_sweeps.norms.statistics import SYNCS

__all__ = [
    "NORMS",
    "SYNCS",
    "BatchLayerNorm",
    "BatchNorm",
    "CausalBatchNorm",
    "DyT",
    "Identity",
    "LayerNorm",
    "PowerNorm",
    "RMSNorm",
    "build_norm",
]
