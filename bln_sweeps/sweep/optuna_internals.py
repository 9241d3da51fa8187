"""The only place a sweep reaches past Optuna's public API, and why each reach is needed.

Everything else in bln_sweeps.sweep uses the public API: `study.ask` / `study.tell`,
`trial.set_user_attr`, `study.set_user_attr`, `study.get_trials(states=...)`. Optuna offers no
public call for three things a pull-based sweep with many workers must do:

- write to a trial this process does not hold a `Trial` for: a worker reaping another worker's
  dead trial only has the `FrozenTrial` it read from the shared storage, and a `FrozenTrial`'s
  setters change the local copy, not the storage. Failing it goes to the storage too, not through
  `study.tell`, which would first run this worker's sampler hooks on a trial it never sampled;
- hand a RUNNING trial back as WAITING (`bln-sweep stop`, preemption): `study.tell` only finishes
  a trial, and Optuna has no "requeue this trial" call;
- stamp a heartbeat from a side thread, and read a study note written before this module existed:
  Optuna 5 removed `Trial.set_system_attr` and `Study.system_attrs`, and its own heartbeat exists
  for RDB storage only (our embedded default is a journal file).

Each function goes through the storage's documented `BaseStorage` methods, so a storage backend
change in Optuna breaks here, in one file, and nowhere else.
"""

from typing import Any


def fail_stale(study, trial, attrs: dict[str, Any]) -> None:
    """Set user attributes of a RUNNING trial another process started (`trial` a FrozenTrial),
    then fail it. Raises when another worker finished or reaped it first."""
    from optuna.trial import TrialState

    for key, value in attrs.items():
        study._storage.set_trial_user_attr(trial._trial_id, key, value)
    study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)


def hand_back(trial) -> None:
    """A RUNNING trial back to WAITING: the next `study.ask` of any worker gets the same trial
    (number, params, user attributes) again and resumes it from its checkpoint."""
    from optuna.trial import TrialState

    trial.storage.set_trial_state_values(trial._trial_id, TrialState.WAITING)


def trial_id(trial) -> int:
    """The storage id of a trial (what a heartbeat stamps; numbers are per study, ids global)."""
    return trial._trial_id


def stamp(study, trial_id: int, key: str, value: Any) -> None:
    """A system attribute of a running trial: the heartbeat, written from a daemon thread."""
    study._storage.set_trial_system_attr(trial_id, key, value)


def legacy_study_note(study, key: str) -> Any:
    """A study note sweeps made before notes became study user attributes (they were system
    attributes), so a sweep started by an older version still reads right."""
    return study._storage.get_study_system_attrs(study._study_id).get(key)
