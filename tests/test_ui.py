"""Browsing runs: `bln-sweep ui` on a sweep's store, the MLflow server on PostgreSQL for clusters,
and the UI in a real headless Chromium."""

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

from launchers.ui import server_command
from tests.conftest import service_missing
from tests.test_sweep import FAST, assert_complete, bln_sweep, sweep_facts

ROOT = Path(__file__).resolve().parents[1]
SERVER_SCRIPT = ROOT / "launchers" / "scripts" / "mlflow-server.sh"
PG_URL = os.environ.get("BLN_PG_URL", "postgresql://postgres@127.0.0.1:5432")
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def bln_ui(*args, cwd, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "launchers", "ui", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_error_line(p) -> str:
    assert p.returncode == 2, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    return lines[0]


def write_manifest(root: Path, name: str, tracking_uri: str) -> None:
    """A sweep directory as bln-sweep leaves it, as far as `bln-sweep ui` reads it."""
    sweep_dir = root / "sweeps" / name
    sweep_dir.mkdir(parents=True)
    manifest = {"sweep": name, "tracking_uri": tracking_uri, "search": {"metric": "val/loss"}}
    (sweep_dir / "manifest.json").write_text(json.dumps(manifest))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def listener():
    """A real socket listening on a loopback port it never accepts on: the port is in use, and
    an HTTP request to it connects but gets no answer."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


# ---- bad input: one line, exit code 2 (real sockets, real subprocesses; seconds each) ---------


@pytest.mark.parametrize(
    "args, words",
    [
        (["a", "b"], ["one sweep name"]),
        (["a", "--port", "http"], ["--port", "not a number"]),
        (["a", "--port", "70000"], ["--port", "65535"]),
        (["a", "--open"], ["unknown flag --open", "--port, --host"]),
    ],
)
def test_bad_arguments_are_one_line(args, words, tmp_path):
    line = one_error_line(bln_ui(*args, cwd=tmp_path))
    assert all(w in line for w in words), line


def test_unknown_sweep_lists_the_sweeps(tmp_path):
    write_manifest(tmp_path, "alpha", "sqlite:////nonexistent/mlflow.db")
    write_manifest(tmp_path, "beta", "sqlite:////nonexistent/mlflow.db")
    line = one_error_line(bln_ui("gamma", cwd=tmp_path))
    assert "'gamma'" in line and "sweeps: alpha, beta" in line
    line = one_error_line(bln_ui(cwd=tmp_path))  # no name: the default sweep, `sweep.name`
    assert "'default'" in line and "sweeps: alpha, beta" in line


def test_port_in_use_is_rejected(tmp_path):
    write_manifest(tmp_path, "s", f"sqlite:///{tmp_path}/mlflow.db")
    with listener() as port:
        line = one_error_line(bln_ui("s", "--port", str(port), cwd=tmp_path))
    assert f"port {port}" in line and "in use" in line


def test_another_interface_needs_the_flag_and_warns_of_no_authentication(tmp_path):
    write_manifest(tmp_path, "s", f"sqlite:///{tmp_path}/mlflow.db")
    # A port taken on loopback is taken for 0.0.0.0 too: the command stops before it serves, so
    # the test never exposes anything beyond this machine.
    with listener() as port:
        p = bln_ui("s", "--host", "0.0.0.0", "--port", str(port), cwd=tmp_path)
        quiet = bln_ui("s", "--port", str(port), cwd=tmp_path)  # the default: 127.0.0.1
    assert p.returncode == 2
    warning, error = p.stderr.strip().splitlines()
    assert "warning" in warning and "0.0.0.0" in warning and "no authentication" in warning
    assert "in use" in error
    assert "warning" not in quiet.stderr and "in use" in one_error_line(quiet)
    # MLflow 3 refuses Host headers beyond localhost and private IPs: the machine's name is added.
    cmd = server_command("sqlite:///x.db", "0.0.0.0", 5000, tmp_path)
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert socket.gethostname() in cmd[cmd.index("--allowed-hosts") + 1]
    assert "--allowed-hosts" not in server_command("sqlite:///x.db", "127.0.0.1", 5000, tmp_path)


def test_the_host_allow_list_names_this_machine_and_admits_no_other_dns_name(tmp_path):
    """Checked with MLflow's own matcher: the entries admit this machine's names and addresses
    (with the port), and no wildcard lets a DNS name that merely starts like one in."""
    from mlflow.server.security_utils import is_allowed_host_header

    cmd = server_command("sqlite:///x.db", "0.0.0.0", 5000, tmp_path)
    allowed = cmd[cmd.index("--allowed-hosts") + 1].split(",")
    assert not [a for a in allowed if "*" in a], allowed
    for ok in (socket.gethostname(), f"{socket.gethostname()}:5000", "127.0.0.1:5000"):
        assert is_allowed_host_header(allowed, ok), ok
    for evil in (
        "10.attacker.example",
        "192.168.1.1.nip.io:5000",
        "172.evil.example",
        f"{socket.gethostname()}.attacker.example",
        f"{socket.gethostname()}:5000.attacker.example",
        "localhost:6000",
    ):
        assert not is_allowed_host_header(allowed, evil), evil


def test_refused_tracking_server_is_rejected(tmp_path):
    port = free_port()  # nothing listens there: connection refused
    write_manifest(tmp_path, "s", f"http://127.0.0.1:{port}")
    line = one_error_line(bln_ui("s", cwd=tmp_path))
    assert f"http://127.0.0.1:{port}" in line and "unreachable" in line


def test_silent_tracking_server_times_out_quickly(tmp_path):
    with listener() as port:  # connects, never answers
        write_manifest(tmp_path, "s", f"http://127.0.0.1:{port}")
        line = one_error_line(bln_ui("s", cwd=tmp_path))
    # our own /health probe gave up (a few seconds), not MlflowClient's minutes of retries
    assert "unreachable" in line and "timed out" in line


def test_ui_path_does_not_import_torch(tmp_path):
    write_manifest(tmp_path, "s", f"http://127.0.0.1:{free_port()}")
    code = (
        "import sys; from launchers.ui import run; assert run(['s']) == 2; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


# ---- the UI on a real sweep ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """Two cells (layernorm, bln), one trial each, made by bln-sweep in-process (debug)."""
    root = tmp_path_factory.mktemp("ui")
    p = bln_sweep(
        "norm=layernorm,bln",
        "batch=b4",
        "sweep.name=ui",
        "search.n_trials=1",
        "search.confirm_seeds=0",
        "search.pruner=none",
        "launcher=debug",
        *FAST,
        cwd=root,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    runs = [r for r in sweep_facts(root / "sweeps" / "ui")["runs"] if "trial" in r.data.tags]
    assert len(runs) == 2
    return root, runs


@contextmanager
def running(cmd, cwd, ready: str, timeout: float = 300, **kw):
    """Start `cmd`, yield its stdout lines up to and including the first containing `ready`;
    stop it with SIGTERM (Ctrl-C's equivalent for a background process) at the end."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, text=True, **kw)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + timeout
        while not any(ready in x for x in seen):
            assert proc.poll() is None, f"exited {proc.returncode}: {''.join(seen)}"
            assert time.monotonic() < deadline, f"no {ready!r} in {timeout} s: {''.join(seen)}"
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                pass
        yield proc, seen
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise


def line_after(lines: list[str], prefix: str) -> str:
    return next(x for x in lines if x.startswith(prefix)).split(prefix, 1)[1].strip()


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def chromium():
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        service_missing(
            f"needs {CHROMIUM} and {CHROMEDRIVER}: apt-get install -y chromium chromium-driver"
        )
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs pip install selenium")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # No network beyond loopback here: keep Chromium from trying to reach Google's services.
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1600,900",
    ):
        options.add_argument(flag)
    profile = Path(os.environ.get("TMPDIR", "/tmp")) / f"bln-chromium-{uuid.uuid4().hex}"
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(120)
    return driver, profile


def page_text_with(driver, words: list[str], timeout: float = 120) -> str:
    """The page's visible text once every word is in it (the UI renders after its API calls)."""
    deadline = time.monotonic() + timeout
    while True:
        text = driver.find_element("tag name", "body").text
        missing = [w for w in words if w not in text]
        if not missing:
            return text
        assert time.monotonic() < deadline, f"not on the page after {timeout} s: {missing}"
        time.sleep(1)


def tidy(driver) -> None:
    """Close the MLflow Assistant panel and the shared-view banner, for a readable screenshot."""
    for label in ("Close", "Hide banner"):
        for button in driver.find_elements("css selector", f'button[aria-label="{label}"]'):
            try:
                button.click()
            except Exception:  # hidden or gone already: cosmetic only
                pass
    time.sleep(1)


@pytest.mark.slow
def test_sweep_runs_norms_and_metrics_are_visible_in_a_real_browser(tiny_sweep, tmp_path):
    root, runs = tiny_sweep
    driver, profile = chromium()
    port = free_port()
    try:
        cmd = [sys.executable, "-m", "launchers", "ui", "ui", "--port", str(port)]
        with running(cmd, root, ready="sweep view:") as (proc, lines):
            base = line_after(lines, "MLflow UI:").split()[0]
            assert base == f"http://127.0.0.1:{port}"
            view = line_after(lines, "sweep view:")
            assert view.startswith(f"{base}/#/experiments/")

            driver.get(view)
            names = [r.info.run_name for r in runs]
            assert sorted(names) == ["bln · b4 · s64 · trial 0", "layernorm · b4 · s64 · trial 0"]
            # Run names are cut with "…" when the column is narrow; the table's own text is whole.
            values = [repr(r.data.metrics["val/loss"])[:6] for r in runs]
            headers = ["val/loss", "norm.name", "batch.size", "seq.len", "optim.lr"]
            text = page_text_with(driver, [*names, *values, *headers, "bln sweep"])
            cells = text.splitlines()  # one table cell a line: the norm.name column's values
            assert "layernorm" in cells and "bln" in cells
            # best run first: the view sorts by the headline metric
            ranked = sorted(runs, key=lambda r: r.data.metrics["val/loss"])
            assert text.index(ranked[0].info.run_name) < text.index(ranked[1].info.run_name)
            tidy(driver)
            shot = tmp_path / "ui.png"
            assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 20_000

            # Nested: one row, the sweep's parent run, over its 2 cells and their 2 trials. (A new
            # page: the UI keeps showing its skeleton after a hash-only move off a shared view.)
            driver.get("about:blank")
            driver.get(line_after(lines, "experiment:"))
            page_text_with(driver, ["sweep ui", "5 matching runs"])
        assert proc.returncode == 0
        assert port_is_free(port)  # Ctrl-C / SIGTERM stopped the server's whole process group
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


# ---- cluster mode: MLflow server on PostgreSQL, Optuna on PostgreSQL, concurrent workers ------


def postgres_or_skip() -> None:
    from urllib.parse import urlsplit

    u = urlsplit(PG_URL)
    try:
        socket.create_connection((u.hostname, u.port or 5432), timeout=3).close()
    except OSError as e:
        service_missing(f"PostgreSQL not reachable at {u.hostname}:{u.port or 5432} ({e})")


def drop_databases(*names: str) -> None:
    import sqlalchemy

    engine = sqlalchemy.create_engine(f"{PG_URL}/postgres", isolation_level="AUTOCOMMIT")
    with engine.connect() as c:
        for name in names:
            c.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


@pytest.mark.slow
def test_sweep_with_concurrent_workers_on_an_mlflow_server_with_postgresql(tmp_path):
    postgres_or_skip()
    import sqlalchemy
    from mlflow.tracking import MlflowClient

    db = f"bln_test_{uuid.uuid4().hex[:12]}"  # one per test run; dropped at the end
    cmd = ["bash", str(SERVER_SCRIPT), "--pg", PG_URL, "--db", db, "--port", str(free_port())]
    cmd += ["--artifacts", str(tmp_path / "artifacts"), "--workers", "2"]
    log = open(tmp_path / "server.log", "w")
    try:
        with running(cmd, tmp_path, ready="tracking.uri=", stderr=log) as (_, lines):
            overrides = next(x for x in lines if "tracking.uri=" in x).split()
            uri = next(o for o in overrides if o.startswith("tracking.uri=")).split("=", 1)[1]
            assert f"storage.url={PG_URL}/{db}_optuna" in overrides
            p = bln_sweep(
                "norm=layernorm,rmsnorm",
                "batch=b4",
                "sweep.name=pg",
                "search.n_trials=2",
                "search.confirm_seeds=1",
                "search.pruner=none",
                "launcher.workers=3",  # three worker processes log to the server at once
                *FAST,
                *overrides,
                cwd=tmp_path,
            )
            assert p.returncode == 0, p.stdout + p.stderr
            sweep_dir = tmp_path / "sweeps" / "pg"
            assert not (sweep_dir / "mlflow.db").exists()
            facts = sweep_facts(sweep_dir)
            assert_complete(facts, n_trials=2, confirm_seeds=1)
            runs = facts["runs"]
            kinds = sorted(r.data.tags["kind"] for r in runs)
            assert kinds == ["cell"] * 2 + ["confirm"] * 2 + ["sweep"] + ["trial"] * 4
            assert {r.info.status for r in runs} == {"FINISHED"}

            # every metric point and artifact arrived, through the server
            client = MlflowClient(tracking_uri=uri)
            trials = {
                t.user_attrs["mlflow_run_id"]: t
                for cell in facts["cells"].values()
                for t in cell["search"] + cell["confirm"]
            }
            trained = [r for r in runs if r.data.tags["kind"] in ("trial", "confirm")]
            assert {r.info.run_id for r in trained} == set(trials)
            for r in trained:
                val = client.get_metric_history(r.info.run_id, "val/loss")
                assert sorted(m.step for m in val) == [4, 8, 12], r.info.run_name
                assert len(client.get_metric_history(r.info.run_id, "train/loss")) == 3
                reported = trials[r.info.run_id].intermediate_values
                if r.data.tags["kind"] == "trial":  # what Optuna was told = what MLflow holds
                    assert {m.step: m.value for m in val} == reported
                artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
                assert {"config.yaml", "loss_curve.png"} <= artifacts
            assert list((tmp_path / "artifacts").rglob("config.yaml"))

            # the runs are rows in PostgreSQL, and Optuna's studies (search + confirm per cell) in
            # its own database
            for name, query, expected in (
                (db, "SELECT count(*) FROM runs", len(runs)),
                (f"{db}_optuna", "SELECT count(*) FROM studies", 2 * len(facts["cells"])),
            ):
                engine = sqlalchemy.create_engine(f"{PG_URL}/{name}")
                with engine.connect() as c:
                    assert c.execute(sqlalchemy.text(query)).scalar() == expected
                engine.dispose()

            # the sweep's UI is the server's own: `bln-sweep ui` checks it and prints the URL
            ui = bln_ui("pg", cwd=tmp_path)
            assert ui.returncode == 0, ui.stderr
            experiment_id = MlflowClient(uri).get_experiment_by_name("pg").experiment_id
            assert f"{uri}/#/experiments/{experiment_id}/runs" in ui.stdout
    finally:
        log.close()
        drop_databases(db, f"{db}_optuna")
