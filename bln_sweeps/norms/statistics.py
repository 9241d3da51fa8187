"""What every family shares in computing its statistics: fp32 arithmetic with autocast off,
sums across ranks (option `sync`), and the compile path's branch and buffer snapshot (the
custom op `bln_sweeps::snapshot`, registered once, when this module is first imported)."""

import torch
import torch.distributed as dist


def upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 for the statistics; fp32 and fp64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def column_sum(x: torch.Tensor) -> torch.Tensor:
    """Per-channel sum of x (..., C) over all other dims -> (C,). A matrix-vector product: one
    read of x, where torch's strided sum over dim 0 is several times slower on CPU."""
    rows = x.reshape(-1, x.shape[-1])
    return rows.new_ones(rows.shape[0]) @ rows


def fp32(x: torch.Tensor):
    """Context for the statistics: autocast off (we upcast explicitly)."""
    return torch.autocast(device_type=x.device.type, enabled=False)


# -----------------------------------------------------------------------------
# Batch statistics across ranks (option `sync`): "local" reduces over this rank's micro-batch,
# "global" over the micro-batches of every rank of the default process group (SyncBatchNorm
# semantics). Statistics are built from sums, and the sums are all-reduced with the autograd-aware
# all_reduce, whose backward all-reduces the incoming gradient: rank r's input moves every rank's
# statistics, so its gradient collects every rank's loss through them, exactly as one process
# holding the whole global batch would compute it.

SYNCS = ("local", "global")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def group_sum(t: torch.Tensor, sync: str) -> torch.Tensor:
    """t summed over the ranks when sync == "global" and several ranks run; else t itself."""
    if sync == "local" or not is_distributed():
        return t
    if not t.requires_grad:
        t = t.clone()
        dist.all_reduce(t)
        return t
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(t)


def rank_sums(*ts: torch.Tensor, sync: str) -> tuple[torch.Tensor, ...]:
    """Each t summed over the ranks when sync == "global" and several ranks run, in ONE
    all-reduce (flattened, concatenated in the first t's dtype, split back); else the ts
    themselves. No autograd: for sums that no gradient flows through, and for the sums a
    hand-written backward takes (PowerNorm, causal BatchNorm). Under torch.compile the
    functional all-reduce, which Dynamo traces into the graph (also inside a backward)."""
    if sync == "local" or not is_distributed():
        return ts
    flat = torch.cat([t.reshape(-1).to(ts[0].dtype) for t in ts])
    if compiling():
        from torch.distributed._functional_collectives import all_reduce

        flat = all_reduce(flat, "sum", dist.group.WORLD)
    else:
        flat = flat.detach().clone()  # cat of one tensor may alias it; all_reduce is in place
        dist.all_reduce(flat)
    parts = flat.split([t.numel() for t in ts])
    return tuple(p.view(t.shape).to(t.dtype) for p, t in zip(parts, ts, strict=True))


# -----------------------------------------------------------------------------
# The compile path. Under torch.compile (`train.compile=true`) every norm runs a formulation
# Inductor can fuse: plain differentiable ops, or an autograd.Function whose forward and backward
# are plain ops (Dynamo traces both into the graph). The hand-written kernels-by-composition of
# the eager path (out= buffers, borrowed ATen backward kernels, matrix-vector column sums) are
# faster eagerly but opaque to fusion. The branch is on `torch.compiler.is_compiling()`, which
# is a constant while Dynamo traces, so it costs no guard and no graph break.


def compiling() -> bool:
    return torch.compiler.is_compiling()


@torch.library.custom_op("bln_sweeps::snapshot", mutates_args=())
def snapshot(x: torch.Tensor) -> torch.Tensor:
    """A copy of a buffer's value before this call updates it, as an opaque op. Inductor's
    partitioner may recompute a plain `buffer.clone()` in the backward graph, which then reads the
    buffer after the forward's in-place update (pytorch/pytorch#197039, silently wrong
    gradients); it never recomputes an opaque custom op, so this copy is saved instead."""
    return x.clone()


@snapshot.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)
