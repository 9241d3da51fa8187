"""Batch statistics across ranks (`norm.options.sync`), on CPU with gloo and 2 ranks.

Each case splits one global batch (B = 4 sequences) into two per-rank micro-batches of 2. With
sync=global the norm must be the single-process norm over the global batch: the same outputs,
the same input gradients, parameter gradients that sum over the ranks to the single-process ones
(what DDP's gradient all-reduce adds up), and the same running statistics on every rank. With
sync=local each rank is the single-process norm of its own micro-batch.

Each case runs a few train steps (2 by default) and compares the last: PowerNorm's cases cover
the warm-up (3 calls, all dividing by the batch statistic q: cumulative-average and EMA phi
updates) and after it (warm-up of 1 call, then 3 calls dividing by the running phi while e, the
backward's running mean, has moved), with both backward scales.
"""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bln_sweeps.compose import compose
from bln_sweeps.config import ConfigError, to_run_config, validate
from bln_sweeps.norms import build_norm

B, T, C, RANKS = 4, 8, 12, 2
PN_WARMUP = {"groups": 3, "warmup_steps": 4}  # 3 calls below: all in the warm-up
PN_RUNNING = {"groups": 3, "warmup_steps": 1}  # call 1 in the warm-up, calls 2-4 after it
CASES = {  # label -> (registry key, options, padded[, train steps])
    "batchnorm": ("batchnorm", {}, False),
    "batchnorm_padded": ("batchnorm", {}, True),
    "bln": ("bln", {"batch_size": B, "max_len": T}, False),
    "bln_padded": ("bln", {"batch_size": B, "max_len": T}, True),
    "bln_batch_time": ("bln", {"batch_size": B, "max_len": T, "batch_axes": "batch_time"}, False),
    "causal_batchnorm": ("causal_batchnorm", {}, False),
    "causal_batchnorm_padded": ("causal_batchnorm", {}, True),
    "powernorm_warmup": ("powernorm", PN_WARMUP, False, 3),
    "powernorm_warmup_padded": ("powernorm", PN_WARMUP, True, 3),
    "powernorm_running": ("powernorm", PN_RUNNING, False, 4),
    "powernorm_running_padded": ("powernorm", PN_RUNNING, True, 4),
    "powernorm_paper_backward": (
        "powernorm", {**PN_RUNNING, "backward_scale": "running"}, True, 4
    ),
}  # fmt: skip


def case(label):
    key, options, padded, *steps = CASES[label]
    return key, options, padded, (steps or [2])[0]


def data(padded: bool):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, C, generator=g, dtype=torch.float64) * 2 + 0.5
    dy = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    pad = None
    if padded:  # ragged ends; position 0 stays valid in every sequence
        pad = torch.arange(T).expand(B, T) >= torch.tensor([[T], [T - 3], [T - 1], [2]])
    return x, dy, pad


def make(key, options, sync):
    torch.manual_seed(0)
    norm = build_norm(key, C, **options, sync=sync).double().train()
    with torch.no_grad():
        for p in norm.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return norm


def fwd_bwd(norm, x, dy, pad, steps=2, call=None):
    """`steps` train steps (so running statistics move); outputs and grads of the last. `call`:
    what runs the norm (its torch.compile wrapper), default the norm itself."""
    for _ in range(steps):
        norm.zero_grad()
        xg = x.clone().requires_grad_()
        y = (norm if call is None else call)(xg, pad)
        if pad is not None:
            y = y.masked_fill(pad[..., None], 0.0)
        y.backward(dy)
    grads = {k: p.grad.clone() for k, p in norm.named_parameters()}
    return {
        "y": y.detach(),
        "dx": xg.grad,
        "grads": grads,
        "buffers": copy.deepcopy(norm.state_dict()),
    }


def worker(rank: int, store: str, out: str, sync: str, labels=tuple(CASES), compiled=False):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=RANKS)
    try:
        results = {}
        part = slice(rank * B // RANKS, (rank + 1) * B // RANKS)
        for label in labels:
            key, options, padded, steps = case(label)
            x, dy, pad = data(padded)
            norm = make(key, options, sync)
            call = torch.compile(norm, fullgraph=True) if compiled else None  # no graph breaks
            part_pad = None if pad is None else pad[part]
            results[label] = fwd_bwd(norm, x[part], dy[part], part_pad, steps, call)
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=["global", "local"])
def ranks(request, tmp_path_factory):
    """Both ranks' results for every case, for one sync mode (one process group per mode)."""
    tmp = tmp_path_factory.mktemp(f"sync_{request.param}")
    mp.spawn(worker, args=(str(tmp / "store"), str(tmp), request.param), nprocs=RANKS)
    return request.param, [torch.load(tmp / f"rank{r}.pt") for r in range(RANKS)]


def close(a, b, what, rtol=1e-9, atol=1e-10):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def assert_global(results, label, rtol=1e-9, atol=1e-10):
    """The ranks' results (sync=global) against one process holding the whole global batch."""
    key, options, padded, steps = case(label)
    x, dy, pad = data(padded)
    ref = fwd_bwd(make(key, options, "local"), x, dy, pad, steps)
    tol = {"rtol": rtol, "atol": atol}
    close(torch.cat([r[label]["y"] for r in results]), ref["y"], "output", **tol)
    close(torch.cat([r[label]["dx"] for r in results]), ref["dx"], "input grad", **tol)
    for name, g in ref["grads"].items():
        close(sum(r[label]["grads"][name] for r in results), g, f"{name}.grad summed", **tol)
    for r in results:
        for name, b in ref["buffers"].items():
            close(r[label]["buffers"][name], b, f"buffer {name}", **tol)


@pytest.mark.parametrize("label", list(CASES))
def test_sync_matches_the_single_process_norm(ranks, label):
    sync, results = ranks
    key, options, padded, steps = case(label)
    x, dy, pad = data(padded)
    half = B // RANKS
    if sync == "global":  # one process, the whole global batch
        assert_global(results, label)
        return
    for rank, r in enumerate(results):  # local: each rank alone on its micro-batch
        part = slice(rank * half, (rank + 1) * half)
        part_pad = None if pad is None else pad[part]
        ref = fwd_bwd(make(key, options, "local"), x[part], dy[part], part_pad, steps)
        close(r[label]["y"], ref["y"], f"rank {rank} output")
        close(r[label]["dx"], ref["dx"], f"rank {rank} input grad")
        for name, b in ref["buffers"].items():
            close(r[label]["buffers"][name], b, f"rank {rank} buffer {name}")
    # and the ranks' statistics differ: local really is per rank
    assert not torch.equal(
        results[0][label]["y"], results[1][label]["y"][: len(results[0][label]["y"])]
    )


COMPILED = ["causal_batchnorm_padded", "powernorm_running_padded"]


@pytest.mark.slow  # 2 ranks x 2 compiles, ~1 min on 2 cores
def test_sync_global_compiled(tmp_path):
    """The compile path (`train.compile=true`): the functional all-reduce traced into the forward
    and the backward graphs, to compile-path tolerance (test_compile.py's)."""
    mp.spawn(worker, args=(str(tmp_path / "store"), str(tmp_path), "global", COMPILED, True),
             nprocs=RANKS)  # fmt: skip
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(RANKS)]
    for label in COMPILED:
        assert_global(results, label, rtol=1e-4, atol=1e-5)


# causal_batchnorm rejected sync=global, and powernorm had no sync, until both learned it
@pytest.mark.parametrize("key", ["layernorm", "rmsnorm", "dyt", "identity"])
def test_sync_is_rejected_by_per_token_norms(key):
    with pytest.raises(ValueError, match="unknown option 'sync'"):
        build_norm(key, C, sync="global")


@pytest.mark.parametrize("name", ["batchnorm", "bln", "powernorm", "causal_batchnorm"])
def test_config_accepts_sync_global_for_batch_statistic_norms(name):
    cfg = validate(to_run_config(compose([f"norm={name}", "norm.options.sync=global"])))
    assert cfg.norm.options["sync"] == "global"


def test_config_rejects_sync_for_per_token_norms():
    with pytest.raises(ConfigError) as e:
        validate(to_run_config(compose(["norm=layernorm", "norm.options.sync=global"])))
    msg = str(e.value)
    assert msg.startswith("norm.options.sync") and "valid options: " in msg and "\n" not in msg


def test_sync_must_be_local_or_global():
    with pytest.raises(ValueError, match=r"sync='all': valid choices: local, global"):
        build_norm("batchnorm", C, sync="all")
