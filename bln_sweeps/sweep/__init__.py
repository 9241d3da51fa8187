"""A sweep's search, seen from Optuna: what the planner and the workers share.

- space.py     the search grammar, sampler and pruner factories, study names and storage
               (torch-free: the planner validates spaces on a login node)
- design.py    sampler streams, seeds, and best values on the edge of their range
- manifest.py  the typed, versioned `manifest.json` the driver writes and workers read
- budget.py    trials and device-hours spent, per study and per sweep
- worker.py    ask -> train -> tell; trial_config.py composes a trial's config; retries.py and
               stop.py for what goes wrong or is stopped
- optuna_internals.py  the only calls past Optuna's public API, each with its reason

Importing the package imports none of its modules (and never torch).
"""
