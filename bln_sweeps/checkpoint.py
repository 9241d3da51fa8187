"""Checkpoints that make a killed run continue exactly, and the signals that trigger them.

A checkpoint holds everything the remaining steps depend on: model parameters and every norm
buffer, optimizer moments, the step, the RNG states (torch CPU and CUDA), the batch sampler's
position, the MLflow run id (so the resumed run logs into the same MLflow run) and the history
behind the loss-curve plot. Writes are atomic (temp file + fsync + rename), so a crash or a full
disk during a save leaves the previous checkpoint intact.
"""

import io
import os
import signal
import tempfile
from pathlib import Path
from typing import Any

import torch

CKPT_NAME = "ckpt.pt"
RUN_ID_NAME = "mlflow_run_id"  # beside it: the MLflow run id, from the moment the run exists


class Preempted(Exception):
    """Raised after the checkpoint is written when SIGTERM / SIGUSR1 asked the run to stop."""

    def __init__(self, step: int, signum: int, path: Path):
        self.step, self.signum, self.path = step, signum, path
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} at step {step}; checkpoint {path}; rerun to resume")


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: Path, payload: dict[str, Any]) -> None:
    """Atomically replace `path` with `payload`. On failure (e.g. ENOSPC) the old file survives
    and the error says which checkpoint could not be written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".ckpt-", suffix=".tmp")
    try:
        # Serialise in memory first: torch's zip writer reports a full disk as a RuntimeError
        # ("enforce fail at inline_container.cc"); a plain write raises the OSError (ENOSPC).
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OSError(e.errno, f"could not write checkpoint {path}: {e.strerror}") from e
        raise


def load(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    # our own file: optimizer state and RNG tensors need the full unpickler
    return torch.load(path, map_location="cpu", weights_only=False)


class StopSignals:
    """Turns SIGTERM and SIGUSR1 (what SLURM sends before a time limit or preemption) into a flag
    the training loop checks at step boundaries, so the checkpoint is taken between steps."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        self.received = signum

    def __enter__(self) -> "StopSignals":
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
