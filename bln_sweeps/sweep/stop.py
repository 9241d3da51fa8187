"""`bln-sweep stop`: the sweep's STOP file, and how a worker relays it to the trainer.

Torch-free: the driver writes and reads the file on a login node.
"""

from pathlib import Path

STOP_FILE = "STOP"  # written by `bln-sweep stop NAME`, removed when the sweep is run again
STOP_POLL_S = 1.0


def stop_requested(sweep_dir: Path) -> bool:
    return (Path(sweep_dir) / STOP_FILE).exists()


def relay_stop() -> None:
    """SIGUSR1 to this process once the trainer's handler is installed: it checkpoints after the
    step in flight and raises Preempted, and the worker hands the trial back as WAITING. Before
    that (the run still building its model) the signal would kill the process: wait."""
    import os
    import signal

    from bln_sweeps.checkpoint import StopSignals

    handler = signal.getsignal(signal.SIGUSR1)
    if isinstance(getattr(handler, "__self__", None), StopSignals):
        os.kill(os.getpid(), signal.SIGUSR1)
