"""Shared fixtures: real configs composed by Hydra with the tiny model, a temporary MLflow store,
and the rule for tests that need a service (SLURM, PostgreSQL, Chromium, a tmpfs mount): on a
user's machine they skip when it is missing; under CI (`CI=true`), where `.ci/run` has brought
every service up or failed, a skip is a failure, so CI is never green with tests unrun."""

import os

import pytest
import torch

from bln_sweeps.compose import compose
from bln_sweeps.config import to_run_config, validate

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
            "eval.tokens=1024",
            "train.log_interval=1",
            "data.n_train_tokens=50000",
            "data.n_val_tokens=10000",
            f"train.out_dir={tmp_path}/runs",
            f"tracking.uri={mlflow_uri}",
            f"tracking.enabled={str(tracking).lower()}",
        ]
        return validate(to_run_config(compose([*base, *overrides])))

    return make


PG_ADMIN = os.environ.get("BLN_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def service_missing(reason: str):
    """Skip a test whose service is missing; under CI, fail it (the service had to be up)."""
    if under_ci():
        pytest.fail(f"{reason} (CI=true: .ci/run must bring every service up)", pytrace=False)
    pytest.skip(reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI any other skip (importorskip, skipif, a skip inside a test) is reported as a
    failure too: the closing summary shows 0 skipped or the run is red."""
    outcome = yield
    report = outcome.get_result()
    if under_ci() and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"skipped under CI=true: {reason}"


@pytest.fixture
def postgres_url():
    """A fresh database on the machine's PostgreSQL (CI runs one at 127.0.0.1:5432), dropped
    afterwards. Skips when no server answers: a user's machine may not run one."""
    import uuid

    psycopg = pytest.importorskip("psycopg")  # what SQLAlchemy's postgresql:// uses
    try:
        admin = psycopg.connect(PG_ADMIN, connect_timeout=3, autocommit=True)
    except psycopg.OperationalError as e:
        service_missing(f"no PostgreSQL at {PG_ADMIN}: {str(e).strip()}")
    name = f"bln_test_{uuid.uuid4().hex[:10]}"
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    yield PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.close()
