"""Case 6: the MLflow tracking server goes away for 30 s in the middle of a run.

A real `mlflow server` (SQLite backend, its own process group) serves a real `bln-train`; once
the run's first metrics are on the server, the server is killed (SIGKILL, as a crash or a network
cut would leave it), stays down 30 s, and is started again on the same port and store.
tests/test_tracking.py covers the logger's retry logic against injected failures; this is the
whole path: HTTP client, server, a training process that must not notice.
"""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from bln_sweeps.tracking.contract import LOST_METRICS_TAG, metric_key
from tests.faults.conftest import quiet_env, wait_for

OUTAGE_S = 30
STEPS, LOG_EVERY, EVAL_EVERY = 1000, 10, 500  # ~1.5 min on a busy 2-core machine: the outage
RUN = [  # falls well inside the run on any machine
    f"train.steps={STEPS}",
    f"train.log_interval={LOG_EVERY}",
    f"train.eval_interval={EVAL_EVERY}",
    "eval.tokens=512",
    "train.checkpoint_interval=0",
    "data.n_train_tokens=30000",
    "data.n_val_tokens=5000",
    "tracking.experiment=outage",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def start_server(tmp_path, port: int, log) -> subprocess.Popen:
    cmd = [
        *(sys.executable, "-m", "mlflow", "server"),
        *("--backend-store-uri", f"sqlite:///{tmp_path}/server.db"),
        *("--artifacts-destination", str(tmp_path / "artifacts")),
        *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
    ]
    server = subprocess.Popen(
        cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    wait_for(lambda: healthy(port) or server.poll() is not None, "the MLflow server", 300)
    assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
    return server


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(60)


@pytest.mark.slow
def test_training_rides_out_a_tracking_server_outage(tmp_path):
    from mlflow.tracking import MlflowClient

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    client = MlflowClient(tracking_uri=uri)
    log = open(tmp_path / "server.log", "w")
    server = start_server(tmp_path, port, log)
    train = subprocess.Popen(
        [sys.executable, "-m", "bln_sweeps.cli", *RUN, f"tracking.uri={uri}"]
        + [f"train.out_dir={tmp_path}/runs"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=quiet_env(),
        start_new_session=True,
    )
    try:

        def first_metrics():
            exp = client.get_experiment_by_name("outage")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            return runs[0].info.run_id if runs and runs[0].data.metrics else None

        run_id = wait_for(first_metrics, "the run's first metrics on the server")
        down_ms = int(time.time() * 1000)
        kill_group(server)
        time.sleep(OUTAGE_S)
        server = start_server(tmp_path, port, log)
        up_ms = int(time.time() * 1000)
        out, err = train.communicate(timeout=1200)

        assert train.returncode == 0, err[-3000:]
        assert "Traceback" not in err
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["status"] == "finished"
        history = client.get_metric_history(run_id, metric_key("train/loss"))
        expected = list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
        lost = int(run.data.tags.get(LOST_METRICS_TAG, 0))
        assert lost == 0, f"{lost} metric points lost in a {OUTAGE_S} s outage"
        assert sorted(m.step for m in history) == expected
        during = [m for m in history if down_ms < m.timestamp < up_ms]
        assert during, "no step was logged while the server was down: training waited for it"
        val = client.get_metric_history(run_id, metric_key("val/loss"))
        assert sorted(m.step for m in val) == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
    finally:
        for proc in (train, server):
            if proc.poll() is None:
                kill_group(proc)
        log.close()
