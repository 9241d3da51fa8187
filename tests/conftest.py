"""Shared fixtures: real configs composed by Hydra with the tiny model, a temporary MLflow store."""

import pytest
import torch

from bln_sweeps.config import compose, to_run_config, validate

# Two cores on CI: keep torch from oversubscribing them when pytest runs alongside other work.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory):
    """One SQLite store per session: creating one runs MLflow's migrations (seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture
def make_cfg(tmp_path, mlflow_uri):
    """Compose conf/train.yaml with overrides into a validated RunConfig writing under tmp_path."""

    def make(*overrides: str, tracking: bool = True):
        base = [
            "train.steps=6",
            "train.eval_interval=3",
            "train.eval_batches=2",
            "train.log_interval=1",
            "data.n_train_tokens=50000",
            "data.n_val_tokens=10000",
            f"train.out_dir={tmp_path}/runs",
            f"tracking.uri={mlflow_uri}",
            f"tracking.enabled={str(tracking).lower()}",
        ]
        return validate(to_run_config(compose([*base, *overrides])))

    return make
