"""One trial on N ranks (DDP): the process group, and the decisions every rank must share.

A run is distributed when the environment names its rank and world size, as torchrun does and as
submitit's `TorchDistributedEnvironment().export()` does for SLURM tasks:

    RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT

Every rank trains on its own slice of each global batch (`batch.size` sequences per rank), DDP
averages the gradients, and rank 0 alone writes checkpoints and talks to MLflow (and, in a sweep,
to Optuna). Whatever decides whether the loop goes on (the loss that may diverge, the pruner's
verdict, a preemption signal that reached one rank) is agreed on by collective ops, so no rank
is left waiting in an all-reduce the others never join.
"""

import gc
import os
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def requested() -> bool:
    """Whether this process was started as one rank of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def export_submitit_env() -> None:
    """In a submitit job of several tasks (SLURM --ntasks-per-node, or the local executor's
    tasks_per_node): set the torchrun variables for this task from submitit's job environment."""
    if "SUBMITIT_EXECUTOR" not in os.environ or "RANK" in os.environ:
        return
    import submitit
    from submitit.helpers import TorchDistributedEnvironment

    if submitit.JobEnvironment().num_tasks > 1:
        # CUDA_VISIBLE_DEVICES stays the job's set: setup picks cuda:LOCAL_RANK in it
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def setup(device: torch.device, timeout: timedelta = timedelta(minutes=10)) -> torch.device:
    """Join the process group when started as a rank (NCCL on CUDA, gloo on CPU) and return
    this rank's device: cuda:LOCAL_RANK on GPUs. A no-op for a single process."""
    if not requested() or dist.is_initialized():
        return device
    missing = [k for k in ENV if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE > 1 but {', '.join(missing)} not set (torchrun sets all)")
    if device.type == "cuda":
        # one visible GPU per task (a cluster that binds them) or all of the job's
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timeout)
    return device


def teardown() -> None:
    """End the process group, on every rank together (a barrier first), when no collective is
    pending anywhere. DDP and its reducer sit in reference cycles (their hooks hold the module),
    so they may outlive the run that made them; collected here, while the interpreter is whole.
    Left to interpreter exit, gloo's threads free their tensors during finalization and a
    finished rank aborts ("terminate called without an active exception", pytorch#190489)."""
    if not dist.is_initialized():
        return
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()
    gc.collect()


@contextmanager
def group_of_this_run() -> Iterator[None]:
    """The process group of a `bln-train` run started as N ranks (torchrun): `train.run` joins
    it (setup) and this ends it when the run returns or is preempted, which every rank agrees on.
    A group set up by someone else (the sweep worker) is left to them. A run that failed on one
    rank alone leaves the group as it is: the other ranks may wait in a collective, and a
    teardown would hang; that process is ending with the error anyway."""
    from bln_sweeps.checkpoint import Preempted

    owned = requested() and not dist.is_initialized()
    try:
        yield
    except Preempted as e:
        if owned:
            traceback.clear_frames(e.__traceback__)  # the run's frames hold the DDP model
            teardown()
        raise
    if owned:
        teardown()


def _collective_device() -> torch.device:
    """Where a small tensor for a collective must live: NCCL reduces CUDA tensors only."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_rank0() -> bool:
    return rank() == 0


def mean(value: float) -> float:
    """The mean of a per-rank number over the ranks (the train loss every rank then sees)."""
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return t.item() / world_size()


def signal_on_any_rank(signum: int | None) -> int | None:
    """The stop signal one rank received, on every rank (a SLURM signal may reach only some of
    the tasks), or None when none did."""
    if world_size() == 1:
        return signum
    t = torch.tensor([signum or 0], device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item()) or None


def from_rank0(obj):
    """Rank 0's value of a picklable object, on every rank (the pruner's verdict)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows of a global batch (B * world, T): rows [rank * B, (rank + 1) * B)."""
    if world_size() == 1:
        return x, y
    b = x.shape[0] // world_size()
    part = slice(rank() * b, (rank() + 1) * b)
    return x[part], y[part]


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP around the model when several ranks run (gradients averaged over them; buffers, the
    norms' running statistics included, broadcast from rank 0 at each forward); else the model."""
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def follow() -> int:
    """The loop of a sweep worker's ranks other than 0: train each trial rank 0 hands over,
    until it hands over None. A failed trial fails on rank 0 too, which records it and goes on,
    so this rank goes on as well; a preemption ends every rank's process (the job is requeued)."""
    import logging

    from bln_sweeps.checkpoint import Preempted
    from bln_sweeps.train import run

    n = 0
    while (job := from_rank0(None)) is not None:
        cfg, run_dir = job
        try:
            run(cfg, run_dir=run_dir)
        except Preempted:
            raise
        except Exception:
            logging.getLogger(__name__).exception("rank %d: trial in %s failed", rank(), run_dir)
        n += 1
    return n
