"""A sweep worker as a requeueable SLURM job (WorkerJob), what launcher=slurm submits.

Time limits and preemption: submitit asks SLURM for SIGUSR2 `signal_delay_s` before the time
limit (`--signal=USR2@N`). The worker relays it to the running trainer, which finishes its step,
writes its checkpoint and raises `Preempted`; the worker hands the trial back to its study, and
submitit requeues this array task with `scontrol requeue`. The requeued task runs the same worker
again, which resumes the trial from the checkpoint in the same MLflow run. SIGTERM (`scontrol
requeue`, preemption, scancel) makes the trainer checkpoint the same way; SLURM itself then
requeues or ends the job.

Torch-free at import: the login node pickles WorkerJob (by reference) when it submits.
"""

import os

import submitit


class WorkerJob(submitit.helpers.Checkpointable):
    """`bln_sweeps.sweep.worker.worker_main` as a requeueable submitit job.

    submitit calls `checkpoint` and requeues on its preemption signal (SIGUSR2 in submitit
    1.5, `SUBMITIT_PREEMPT_SIGNAL`); the trainer only checkpoints on SIGTERM/SIGUSR1. The relay
    below passes the preemption signal to the running trainer and requeues once the trainer has
    saved, so a requeued job resumes from that checkpoint instead of losing the step in flight.
    Between trials there is nothing to save and submitit requeues at once.
    """

    def __call__(self, sweep_dir: str, worker_id: int) -> int:
        import signal
        import time

        from bln_sweeps.checkpoint import Preempted, StopSignals
        from bln_sweeps.sweep.worker import worker_main

        preempt = submitit.JobEnvironment._usr_sig()
        requeue = signal.getsignal(preempt)  # submitit's checkpoint-and-requeue handler
        requeue = requeue if callable(requeue) else None

        # In a job of several tasks (a trial on several ranks) every task gets the signal, and
        # rank 0 alone requeues, after it saved: a requeue from another rank would kill rank 0
        # before its checkpoint. RANK is set by worker_main from submitit's job environment.
        def rank0() -> bool:
            return os.environ.get("RANK", "0") == "0"

        def relay(signum, frame):
            trainer = signal.getsignal(signal.SIGUSR1)
            if isinstance(getattr(trainer, "__self__", None), StopSignals):
                trainer(signum, frame)  # checkpoint after this step, then Preempted
            elif requeue is not None and rank0():
                requeue(signum, frame)  # checkpoint() + scontrol requeue + exit

        signal.signal(preempt, relay)
        try:
            return worker_main(sweep_dir, worker_id)
        except Preempted as e:
            if e.signum == preempt and requeue is not None and rank0():
                requeue(e.signum, None)  # exits: requeued, or UncompletedJobError past the limit
            # SIGTERM: SLURM requeues (scontrol requeue, preemption) or ends (scancel) the job
            # itself. submitit's own preemption test sends SIGTERM and then SIGUSR2: give that
            # signal a moment to arrive (relay requeues), then leave without a result so that a
            # requeued run is not mistaken for a finished one.
            deadline = time.time() + 3
            while time.time() < deadline:
                time.sleep(0.1)
            raise SystemExit(f"worker {worker_id}: {e}") from None
