"""bln_sweeps.tracking: names, URIs, provenance, and RunLogger against a real SQLite store.

Backend trouble is simulated by wrapping a real MlflowClient (blocking, failing N times, dead),
so nothing here waits on wall-clock guesses or a real tracking server.
"""

import logging
import math
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bln_sweeps.tracking import (
    Retry,
    RunLogger,
    contract,
    find_runs,
    is_secret_name,
    provenance,
    provenance_tags,
    resolve_tracking_uri,
)
from bln_sweeps.tracking.contract import (
    LOST_METRICS_TAG,
    flatten_config,
    logical_metric_name,
    metric_key,
)

ROOT = Path(__file__).resolve().parents[1]
FAST = Retry(budget_s=30, first_wait_s=0.01, max_wait_s=0.05)


@pytest.fixture
def client(mlflow_uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=mlflow_uri)


@pytest.fixture
def experiment(request):
    """One experiment per test in the shared store."""
    return re.sub(r"\W+", "-", request.node.name)


class Wrapped:
    """A real MlflowClient whose metric-carrying log_batch calls run `before_metrics` first."""

    def __init__(self, client, before_metrics):
        self._client, self._before = client, before_metrics
        self.metric_calls = 0

    def __getattr__(self, name):
        return getattr(self._client, name)

    def log_batch(self, run_id, metrics=(), params=(), tags=(), synchronous=None):
        if metrics:
            self.metric_calls += 1
            self._before()
        self._client.log_batch(run_id, metrics, params, tags, synchronous=synchronous)


def fail_first(n):
    calls = iter(range(10**9))

    def before():
        if next(calls) < n:
            raise ConnectionError("tracking server unreachable")

    return before


def history(client, run_id, name):
    return [(m.step, m.value) for m in client.get_metric_history(run_id, metric_key(name))]


# ---- names ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, key",
    [
        ("val/loss", "val/loss"),
        ("val/loss@batch", "val/loss:batch"),
        ("val/loss@bln-TTFF", "val/loss:bln-TTFF"),
        ("perf/tokens_per_s", "perf/tokens_per_s"),
        ("a b.c-d_e", "a b.c-d_e"),
    ],
)
def test_metric_key_round_trip(name, key):
    assert metric_key(name) == key
    assert logical_metric_name(key) == name


@pytest.mark.parametrize(
    "name, says",
    [
        ("val/loss#x", "'#'"),
        ("val/loss:batch", "reserved"),
        ("loss (nats)", "'('"),
        ("", "non-empty"),
        ("/val/loss", "clean path"),
        ("val//loss", "clean path"),
        ("val/loss/", "clean path"),
        ("x" * 251, "250"),
    ],
)
def test_metric_key_rejects_what_mlflow_would(name, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        metric_key(name)


# ---- params ---------------------------------------------------------------------------------


def test_flatten_config():
    cfg = {
        "norm": {"name": "bln", "options": {"zeta": 0.5, "stats": None}, "final": None},
        "batch": {"size": 16, "tokens_per_step": None},
        "seq": {"len": 2048},
        "optim": {"lr": 3e-4, "fused": True, "betas": [0.9, 0.95]},
        "eval": {"bln_switches": ["TTFF", "all"], "extra": {}},
        "seed": 0,
    }
    assert flatten_config(cfg) == {
        "norm.name": "bln",
        "norm.options.zeta": "0.5",
        "norm.options.stats": "None",
        "norm.final": "None",
        "batch.size": "16",
        "batch.tokens_per_step": "None",
        "seq.len": "2048",
        "optim.lr": "0.0003",
        "optim.fused": "True",
        "optim.betas": "[0.9, 0.95]",
        "eval.bln_switches": '["TTFF", "all"]',
        "eval.extra": "{}",
        "seed": "0",
    }


def test_flatten_config_masks_credentials_in_urls():
    cfg = {"storage": {"url": "postgresql://bob:hunter2@db:5432/optuna", "plain": "http://h:1/x"}}
    assert flatten_config(cfg) == {
        "storage.url": "postgresql://bob:***@db:5432/optuna",
        "storage.plain": "http://h:1/x",
    }


def test_flatten_config_truncates_long_values_visibly():
    value = flatten_config({"data": {"path": "x" * 7000}})["data.path"]
    assert len(value) == contract.MAX_PARAM_VAL_LENGTH  # MLflow's limit, 6000 in 3.17
    assert value.startswith("xxx") and value.endswith("...<truncated: 7000 chars>")


# ---- tracking URIs --------------------------------------------------------------------------


def test_resolve_tracking_uri(tmp_path):
    db = tmp_path / "mlflow.db"
    assert resolve_tracking_uri(None, tmp_path) == f"sqlite:///{db}"
    assert resolve_tracking_uri("", tmp_path) == f"sqlite:///{db}"
    assert resolve_tracking_uri(f"sqlite:///{db}", Path("/elsewhere")) == f"sqlite:///{db}"
    assert resolve_tracking_uri("sqlite:///sub/m.db", tmp_path) == f"sqlite:///{tmp_path}/sub/m.db"
    assert resolve_tracking_uri("runs/m.db", tmp_path) == f"sqlite:///{tmp_path}/runs/m.db"
    assert resolve_tracking_uri(str(db), Path("/elsewhere")) == f"sqlite:///{db}"
    for uri in (
        "http://127.0.0.1:5000",
        "https://mlflow.example.org",
        "postgresql://u@db:5432/mlflow",
        "postgresql+psycopg2://u@db/mlflow",
    ):
        assert resolve_tracking_uri(uri, tmp_path) == uri


@pytest.mark.parametrize(
    "uri, says",
    [
        ("file:./mlruns", "refuses the file store"),
        ("file:///abs/mlruns", "refuses the file store"),
        ("ftp://host/x", "sqlite:///<path>"),
        ("sqlite://relative.db", "http(s)://"),
    ],
)
def test_resolve_tracking_uri_rejects(uri, says, tmp_path):
    with pytest.raises(ValueError, match=re.escape(says)) as e:
        resolve_tracking_uri(uri, tmp_path)
    assert "tracking.uri" in str(e.value) and uri in str(e.value)


def test_resolve_tracking_uri_rejects_a_directory(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        resolve_tracking_uri(str(tmp_path), tmp_path)


# ---- provenance -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, secret",
    [
        ("MY_API_TOKEN", True),
        ("aws_secret_access_key", True),
        ("DB_PASSWORD", True),
        ("SSH_KEY", True),
        ("SLURM_JOB_ID", False),
        ("CUDA_VISIBLE_DEVICES", False),
    ],
)
def test_is_secret_name(name, secret):
    assert is_secret_name(name) is secret


SECRETS = {"MY_API_TOKEN": "tok-0451-do-not-log", "AWS_SECRET_ACCESS_KEY": "aws-0451-do-not-log"}


@pytest.fixture
def slurm_env(monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    # even a secret listed as a tag source is never read
    monkeypatch.setitem(provenance._ENV_TAGS, "MY_API_TOKEN", "api_token")


def test_provenance_tags(slurm_env):
    tags = provenance_tags({"sweep": "s1"})
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode == 0:
        assert tags["git.sha"] == head.stdout.strip()
    assert tags["git.dirty"] in ("true", "false", "unknown")
    assert tags["slurm.job_id"] == "4242" and tags["slurm.array_task_id"] == "3"
    assert tags["cuda_visible_devices"] == "1" and tags["sweep"] == "s1"
    assert {"host", "python", "version.torch", "version.mlflow", "version.numpy"} <= set(tags)
    assert "api_token" not in tags and "slurm.restart_count" not in tags
    assert not any(secret in v for v in tags.values() for secret in SECRETS.values())


def test_no_secret_reaches_a_run(slurm_env, mlflow_uri, client, experiment):
    with RunLogger.start(mlflow_uri, experiment, tags=provenance_tags()) as logger:
        pass
    tags = client.get_run(logger.run_id).data.tags
    assert tags["slurm.job_id"] == "4242"
    assert not any(secret in v for v in tags.values() for secret in SECRETS.values())


# ---- RunLogger ------------------------------------------------------------------------------


def test_run_records_params_tags_and_every_metric(mlflow_uri, client, experiment, tmp_path):
    params = flatten_config({"norm": {"name": "bln"}, "grid": {f"p{i}": i for i in range(250)}})
    logger = RunLogger.start(
        mlflow_uri,
        experiment,
        run_name="bln · b4 · s128",
        params=params,
        tags={"leaky": "false", "seed": 3},
        description="a test run",
    )
    for step in range(1, 6):
        loss = math.nan if step == 4 else 1 / step  # a diverged value is still logged
        logger.log_metrics({"train/loss": loss, "val/loss": 2.0, "val/loss@batch": 2.5}, step)
    logger.log_metrics({"perf/inf": math.inf, **{f"m/{i}": i for i in range(1500)}}, step=6)
    logger.set_tags({"status": "finished"})
    logger.end()

    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "bln · b4 · s128"
    assert run.info.experiment_id == logger.experiment_id
    assert run.data.params == params  # 251 params: three log_batch calls
    tags = run.data.tags
    assert tags["leaky"] == "false" and tags["seed"] == "3" and tags["status"] == "finished"
    assert tags["mlflow.note.content"] == "a test run" and LOST_METRICS_TAG not in tags
    losses = history(client, logger.run_id, "train/loss")
    assert [s for s, _ in losses] == [1, 2, 3, 4, 5] and math.isnan(losses[3][1])
    assert history(client, logger.run_id, "val/loss@batch") == [(s, 2.5) for s in range(1, 6)]
    assert history(client, logger.run_id, "perf/inf")[0][1] > 1e308  # MLflow stores inf as max
    assert run.data.metrics["m/1499"] == 1499  # 1501 points in one call: two log_batch calls
    # an embedded store keeps artifacts beside its database, not in the cwd's ./mlruns
    db_dir = mlflow_uri.removeprefix("sqlite:///").rsplit("/", 1)[0]
    assert run.info.artifact_uri.startswith(f"{db_dir}/mlartifacts/")


def test_resume_by_run_id_continues_the_same_run(mlflow_uri, client, experiment):
    first = RunLogger.start(mlflow_uri, experiment, params={"optim.lr": 1e-3})
    first.log_metrics({"val/loss": 3.0}, step=1)
    first.log_metrics({"val/loss": 2.5}, step=2)
    first.end("KILLED")
    assert client.get_run(first.run_id).info.status == "KILLED"

    again = RunLogger.start(
        mlflow_uri, experiment, run_id=first.run_id, tags={"resumed_from_step": 2}
    )
    assert again.run_id == first.run_id
    assert client.get_run(first.run_id).info.status == "RUNNING"
    again.log_metrics({"val/loss": 2.0}, step=3)
    again.end()
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from_step"] == "2"
    assert [s for s, _ in history(client, first.run_id, "val/loss")] == [1, 2, 3]
    assert len(client.search_runs([first.experiment_id])) == 1


def test_resume_of_an_unknown_run_names_it(mlflow_uri, experiment):
    with pytest.raises(ValueError, match="0123456789abcdef0123456789abcdef"):
        RunLogger.start(mlflow_uri, experiment, run_id="0123456789abcdef0123456789abcdef")


def test_running_run_is_found_by_its_tags_from_the_moment_it_exists(mlflow_uri, experiment):
    """What a retry adopts: the newest RUNNING run with every tag given, quotes in values too
    (a run directory's path); tags written with the run, not after it, so no kill leaves one
    that cannot be found."""
    from bln_sweeps.tracking.runs import running_run

    odd = {"run_dir": "/runs/it's \\ here", "kind": "trial"}
    assert running_run(mlflow_uri, experiment, odd) is None  # no experiment yet
    with RunLogger.start(mlflow_uri, experiment, tags=odd):  # ended: not adoptable
        pass
    older = RunLogger.start(mlflow_uri, experiment, tags=odd)
    time.sleep(0.01)  # start times are in ms
    newer = RunLogger.start(mlflow_uri, experiment, tags=odd)
    other = RunLogger.start(mlflow_uri, experiment, tags={**odd, "run_dir": "/runs/other"})
    assert running_run(mlflow_uri, experiment, odd) == newer.run_id
    assert running_run(mlflow_uri, experiment, {"run_dir": "/runs/other"}) == other.run_id
    assert running_run(mlflow_uri, experiment, {**odd, "kind": "confirm"}) is None
    for logger in (newer, older, other):
        logger.end()
    assert running_run(mlflow_uri, experiment, odd) is None


def test_nested_runs_link_to_their_parent(mlflow_uri, client, experiment):
    with RunLogger.start(mlflow_uri, experiment, run_name="cell") as parent:
        with RunLogger.start(mlflow_uri, experiment, parent_run_id=parent.run_id) as child:
            pass
    assert client.get_run(child.run_id).data.tags["mlflow.parentRunId"] == parent.run_id
    found = find_runs(mlflow_uri, experiment, f"tags.mlflow.parentRunId = '{parent.run_id}'")
    assert [r.info.run_id for r in found] == [child.run_id]


def test_find_runs_lists_experiments_when_the_name_is_wrong(mlflow_uri, experiment):
    with RunLogger.start(mlflow_uri, experiment):
        pass
    with pytest.raises(ValueError, match=re.escape(experiment)):
        find_runs(mlflow_uri, experiment + "-typo")


def test_experiment_created_by_another_process_meanwhile(mlflow_uri, client, experiment):
    class LateToTheRace(Wrapped):
        looked = False

        def get_experiment_by_name(self, name):
            if not self.looked:  # we look, find nothing; then someone else creates it
                self.looked = True
                self._client.create_experiment(name)
                return None
            return self._client.get_experiment_by_name(name)

    logger = RunLogger.start(mlflow_uri, experiment, client=LateToTheRace(client, lambda: None))
    logger.end()
    assert logger.experiment_id == client.get_experiment_by_name(experiment).experiment_id


def test_deleted_experiment_is_reported(mlflow_uri, client, experiment):
    client.delete_experiment(client.create_experiment(experiment))
    with pytest.raises(ValueError, match="tracking.experiment=.*deleted"):
        RunLogger.start(mlflow_uri, experiment)


def test_log_metrics_returns_while_a_send_is_blocked(mlflow_uri, client, experiment):
    sending, release = threading.Event(), threading.Event()

    def block():
        sending.set()
        release.wait(30)

    slow = Wrapped(client, block)
    logger = RunLogger.start(mlflow_uri, experiment, client=slow)
    logger.log_metrics({"train/loss": 1.0}, step=1)
    assert sending.wait(30)  # the sender thread is now stuck inside log_batch
    for step in range(2, 50):
        logger.log_metrics({"train/loss": 1.0 / step}, step=step)
    assert not release.is_set() and slow.metric_calls == 1  # we got here during the send
    release.set()
    logger.end()
    assert len(history(client, logger.run_id, "train/loss")) == 49
    assert slow.metric_calls == 2  # everything queued meanwhile went out in one batch


def test_metrics_survive_an_outage(mlflow_uri, client, experiment, caplog):
    flaky = Wrapped(client, fail_first(3))
    logger = RunLogger.start(mlflow_uri, experiment, client=flaky, retry=FAST)
    for step in range(10):
        logger.log_metrics({"train/loss": step / 10, "val/loss@batch": 1.0}, step=step)
    logger.end()
    assert logger.lost_metrics == 0 and flaky.metric_calls >= 4
    assert [s for s, _ in history(client, logger.run_id, "train/loss")] == list(range(10))
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED" and LOST_METRICS_TAG not in run.data.tags
    assert "retrying" in caplog.text


def test_giving_up_counts_and_tags_lost_metrics(mlflow_uri, client, experiment, caplog):
    dead = Wrapped(client, fail_first(10**9))
    retry = Retry(budget_s=0.2, first_wait_s=0.01, max_wait_s=0.05)
    logger = RunLogger.start(mlflow_uri, experiment, client=dead, retry=retry)
    for step in range(3):
        logger.log_metrics({"train/loss": 1.0, "train/lr": 1e-3}, step=step)
    logger.end()  # must not raise
    assert logger.lost_metrics == 6
    run = client.get_run(logger.run_id)
    assert run.data.tags[LOST_METRICS_TAG] == "6" and run.info.status == "FINISHED"
    assert "6 metric points could not be delivered" in caplog.text


def test_unreachable_http_server_does_not_raise(monkeypatch, caplog):
    from mlflow.tracking import MlflowClient

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own retries: minutes
    client = MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
    retry = Retry(budget_s=0.2, first_wait_s=0.01, max_wait_s=0.05)
    logger = RunLogger(client, "0" * 32, "0", retry=retry)
    logger.log_metrics({"train/loss": 1.0}, step=1)
    logger.set_tags({"status": "finished"})
    logger.end()
    assert logger.lost_metrics == 1
    assert "could not end the run" in caplog.text


def test_rejected_batches_are_dropped_without_waiting(mlflow_uri, client, experiment, caplog):
    logger = RunLogger.start(mlflow_uri, experiment, retry=Retry(budget_s=600))
    client.delete_run(logger.run_id)  # MLflow now refuses everything for this run
    logger.log_metrics({"train/loss": 1.0, "train/lr": 0.1}, step=1)
    logger.end(timeout=60)  # far below the retry budget: only a permanent error ends this
    assert logger.lost_metrics == 2 and "rejected" in caplog.text


def test_context_manager_marks_failed_on_exception(mlflow_uri, client, experiment):
    with pytest.raises(RuntimeError), RunLogger.start(mlflow_uri, experiment) as logger:
        logger.log_metrics({"train/loss": 5.0}, step=1)
        raise RuntimeError("boom")
    assert client.get_run(logger.run_id).info.status == "FAILED"
    assert history(client, logger.run_id, "train/loss") == [(1, 5.0)]


def test_end_is_idempotent_and_later_logging_is_ignored(mlflow_uri, client, experiment, caplog):
    logger = RunLogger.start(mlflow_uri, experiment)
    logger.end("KILLED")
    logger.end("FAILED")
    logger.log_metrics({"train/loss": 1.0}, step=9)
    assert client.get_run(logger.run_id).info.status == "KILLED"
    assert "after end() is ignored" in caplog.text and logger.flush()


def test_bad_input_raises_at_the_call(mlflow_uri, experiment):
    with RunLogger.start(mlflow_uri, experiment) as logger:
        with pytest.raises(ValueError, match="FINISHED, FAILED, KILLED"):
            logger.end("DONE")
        with pytest.raises(ValueError, match="'#'"):
            logger.log_metrics({"loss#1": 1.0}, step=0)
        with pytest.raises(ValueError, match="not a number"):
            logger.log_metrics({"loss": "low"}, step=0)
        with pytest.raises(ValueError, match="tag name"):
            logger.set_tags({"a//b": 1})


def test_artifacts(mlflow_uri, client, experiment, tmp_path):
    (tmp_path / "curve.txt").write_text("1 2 3")
    with RunLogger.start(mlflow_uri, experiment) as logger:
        assert logger.log_artifact(tmp_path / "curve.txt")
        assert logger.log_text("hello", "notes/readme.txt")
        assert logger.log_dict({"norm": {"name": "bln"}}, "config.yaml")
        assert not logger.log_artifact(tmp_path / "missing.png")  # warned, not raised
    paths = {a.path for a in client.list_artifacts(logger.run_id)}
    assert paths == {"curve.txt", "notes", "config.yaml"}


def test_disabled_logger_does_nothing():
    with RunLogger.disabled() as logger:
        logger.log_metrics({"val/loss@batch": 1.0}, step=1)
        logger.set_tags({"a": 1})
        logger.log_params({"b": 2})
        assert logger.flush() and logger.run_id is None and logger.lost_metrics == 0
    logger.end("FAILED")


def test_import_loads_neither_torch_nor_mlflow():
    code = (
        "import sys, bln_sweeps.tracking as t; t.provenance_tags(); "
        "sys.exit(bool({'torch', 'mlflow'} & set(sys.modules)))"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


@pytest.mark.slow
def test_workers_opening_a_new_sqlite_store_together(tmp_path):
    """MLflow migrates a new SQLite store without a lock; tracking_client serialises it."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    go = time.time() + 8  # after every process has imported mlflow
    code = (
        "import sys, time; from bln_sweeps.tracking import RunLogger; import mlflow.tracking\n"
        f"time.sleep(max(0, {go} - time.time()))\n"
        f"RunLogger.start({uri!r}, 'race').end()"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT) for _ in range(6)]
    assert [p.wait(120) for p in procs] == [0] * 6
    assert len(find_runs(uri, "race")) == 6


def test_logging_is_quiet_when_all_is_well(mlflow_uri, experiment, caplog):
    caplog.set_level(logging.WARNING, logger="bln_sweeps.tracking")
    with RunLogger.start(mlflow_uri, experiment) as logger:
        logger.log_metrics({"train/loss": 1.0}, step=1)
    assert not [r for r in caplog.records if r.name == "bln_sweeps.tracking"]
