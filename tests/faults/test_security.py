"""Case 9: security.

- Shell metacharacters in override values never execute and arrive verbatim: through bln-train,
  and through a sweep (the driver's manifest, the worker's re-composed overrides, submitit's
  local launcher). Every payload would create a marker file if any shell ever saw it.
- `bln-sweep ui` binds to 127.0.0.1 unless told otherwise: checked on the listening socket itself.
- Environment variables named like secrets (TOKEN, KEY, SECRET, PASSWORD) never reach the
  tracking store, the artifacts, or any other file a run or a sweep writes: every byte is scanned.
"""

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.faults.conftest import (
    FAST,
    alive,
    bln_sweep,
    cli,
    quiet_env,
    stop_leftovers,
    wait_for,
)

SECRETS = {
    name: f"{name.lower()}-{uuid.uuid4().hex}"
    for name in ("MY_API_TOKEN", "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD", "OPENAI_API_KEY")
}


def payloads(marks: Path) -> list[str]:
    """Values in shell syntax; each creates a file under `marks` if a shell ever runs it."""
    m = [marks / f"pwned-{i}" for i in range(6)]
    return [
        f"$(touch {m[0]});`touch {m[1]}`",
        f'x; touch {m[2]} | touch {m[3]} && touch {m[4]} > {m[5]} " \\ *',
    ]


def all_bytes(root: Path) -> bytes:
    return b"\n".join(p.read_bytes() for p in root.rglob("*") if p.is_file())


def assert_no_secrets(root: Path) -> None:
    data = all_bytes(root)
    leaked = [name for name, value in SECRETS.items() if value.encode() in data]
    assert not leaked, f"{leaked} found in files under {root}"


@pytest.fixture(scope="module")
def evil_run(tmp_path_factory):
    """One bln-train run with shell payloads in three string settings and secrets in its env."""
    root = tmp_path_factory.mktemp("evil-run")
    marks = root / "marks"
    marks.mkdir()
    experiment, run_name = payloads(marks)
    out_dir = root / ("out " + payloads(marks)[0].replace("/", "_"))
    uri = f"sqlite:///{root}/store/mlflow.db"
    p = cli(
        "bln_sweeps.train",
        *["train.steps=4", "train.eval_interval=2", "eval.tokens=512", "seq.len=64"],
        *["data.n_train_tokens=20000", "data.n_val_tokens=4000", f"tracking.uri={uri}"],
        f"tracking.experiment='{experiment}'",
        f"tracking.run_name='{run_name}'",
        f"train.out_dir='{out_dir}'",
        cwd=root,
        env=quiet_env(**SECRETS),
    )
    assert p.returncode == 0, p.stderr
    return {"root": root, "marks": marks, "uri": uri, "values": (experiment, run_name, out_dir)}


@pytest.fixture(scope="module")
def evil_sweep(tmp_path_factory):
    """A one-trial sweep on a local worker, named in shell syntax, with a payload in a base
    override and secrets in its environment."""
    root = tmp_path_factory.mktemp("evil-sweep")
    marks = root / "marks"
    marks.mkdir()
    name = "s $(touch pwned-a);`touch pwned-b`|x"  # relative markers: the processes' cwd
    out_dir = str(root / ("out " + payloads(marks)[1].replace("/", "_")))
    args = [
        "norm=layernorm",
        "sweep.grid={batch: b4}",
        f"sweep.name='{name}'",
        f"train.out_dir='{out_dir}'",
        "search.n_trials=1",
        "search.confirm_seeds=0",
        "search.pruner=none",
        "launcher.workers=1",
        *FAST,
    ]
    try:
        p = bln_sweep(*args, cwd=root, env=quiet_env(**SECRETS))
    finally:
        stop_leftovers(str(root))
    assert p.returncode == 0, p.stdout + p.stderr
    return {"root": root, "marks": marks, "name": name, "out_dir": out_dir}


def nothing_ran(root: Path, marks: Path) -> None:
    assert not list(marks.iterdir())
    assert not list(root.rglob("pwned-*"))
    assert not Path.cwd().joinpath("pwned-a").exists()


@pytest.mark.slow
def test_shell_syntax_in_bln_train_overrides_never_runs_and_arrives_verbatim(evil_run):
    from mlflow.tracking import MlflowClient

    nothing_ran(evil_run["root"], evil_run["marks"])
    experiment, run_name, out_dir = evil_run["values"]
    client = MlflowClient(tracking_uri=evil_run["uri"])
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == run_name
    assert run.data.params["train.out_dir"] == str(out_dir)
    assert out_dir.is_dir() and list(out_dir.glob("*/ckpt.pt"))


@pytest.mark.slow
def test_shell_syntax_in_sweep_overrides_never_runs_and_arrives_verbatim(evil_sweep):
    from mlflow.tracking import MlflowClient

    from bln_sweeps.search import load_manifest

    nothing_ran(evil_sweep["root"], evil_sweep["marks"])
    sweep_dir = evil_sweep["root"] / "sweeps" / evil_sweep["name"]
    m = load_manifest(sweep_dir)
    assert m["sweep"] == evil_sweep["name"]
    client = MlflowClient(tracking_uri=m["tracking_uri"])
    exp = client.get_experiment_by_name(evil_sweep["name"])
    (trial,) = client.search_runs([exp.experiment_id], "tags.kind = 'trial'")
    assert trial.data.params["train.out_dir"] == evil_sweep["out_dir"]
    assert trial.info.status == "FINISHED"


@pytest.mark.slow
def test_no_environment_secret_is_written_anywhere(evil_run, evil_sweep):
    from mlflow.tracking import MlflowClient

    for root in (evil_run["root"], evil_sweep["root"]):
        assert_no_secrets(root)  # stores, artifacts, journals, manifests, job logs, outputs/
    client = MlflowClient(tracking_uri=evil_run["uri"])
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id]):
            values = [*run.data.params.values(), *run.data.tags.values()]
            assert not [v for v in values if any(s in v for s in SECRETS.values())]
            names = [*run.data.params, *run.data.tags]
            assert not [n for n in names if n.upper() in SECRETS]


def listening(pids: set[int]) -> list[str]:
    """host:port of every TCP socket in LISTEN state owned by one of `pids`."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A = LISTEN
                host, port = cols[1].split(":")
                found.append(f"{decode_ip(host, width)}:{int(port, 16)}")
    return found


def decode_ip(hexed: str, width: int) -> str:
    import ipaddress

    raw = bytes.fromhex(hexed)
    words = [raw[i : i + 4][::-1] for i in range(0, len(raw), 4)]  # little-endian 32-bit words
    return str(ipaddress.ip_address(b"".join(words)))


def tree(pid: int) -> set[int]:
    """`pid` and all its descendants (whatever session or process group they moved to)."""
    parents = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text()
            except OSError:
                continue
            parents[int(proc.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        found.add(p)
        todo += [c for c, parent in parents.items() if parent == p and c not in found]
    return found


@pytest.mark.slow
def test_the_sweep_ui_listens_on_loopback_only_by_default(evil_sweep):
    root = evil_sweep["root"]
    ui = subprocess.Popen(
        [sys.executable, "-m", "launchers", "ui", evil_sweep["name"]],
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=quiet_env(),
        start_new_session=True,
    )
    pids = {ui.pid}
    try:

        def sockets():
            pids.update(tree(ui.pid))
            return listening(pids) or ui.poll() is not None

        addresses = wait_for(sockets, "the UI to listen", 300)
        assert ui.poll() is None, "bln-sweep ui exited"
        assert all(a.startswith("127.0.0.1:") for a in addresses), addresses
    finally:
        ui.send_signal(signal.SIGTERM)  # what Ctrl-C would do: it stops its server too
        try:
            ui.wait(60)
        except subprocess.TimeoutExpired:
            ui.kill()
        for pid in pids - {ui.pid}:  # a server it failed to stop (by pid, if still its own)
            if alive(pid) and b"mlflow" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
    nothing_ran(root, evil_sweep["marks"])


@pytest.mark.slow
def test_a_password_in_a_storage_url_is_not_logged(tmp_path):
    from urllib.parse import urlsplit

    import sqlalchemy

    pg = urlsplit(os.environ.get("BLN_PG_URL", "postgresql://postgres@127.0.0.1:5432"))
    server = f"{pg.hostname}:{pg.port or 5432}"
    password = pg.password or f"pw-{uuid.uuid4().hex}"  # any password passes trust auth
    user = f"{pg.username or 'postgres'}:{password}"
    db = f"faults_{uuid.uuid4().hex[:8]}"
    try:
        engine = sqlalchemy.create_engine(
            f"postgresql://{user}@{server}/postgres", isolation_level="AUTOCOMMIT"
        )
        with engine.connect() as c:
            c.execute(sqlalchemy.text(f'CREATE DATABASE "{db}"'))
    except Exception as e:
        pytest.skip(f"PostgreSQL not reachable at {server} ({type(e).__name__})")
    try:
        p = bln_sweep(
            "norm=layernorm",
            "sweep.grid={batch: b4}",
            "sweep.name=pg",
            "storage=postgres",
            f"storage.url=postgresql://{user}@{server}/{db}",
            "search.n_trials=1",
            "search.confirm_seeds=0",
            "launcher=debug",
            *FAST,
            cwd=tmp_path,
        )
        assert p.returncode == 0, p.stdout + p.stderr
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/sweeps/pg/mlflow.db")
        exp = client.get_experiment_by_name("pg")
        for run in client.search_runs([exp.experiment_id]):
            assert password not in str(run.data.tags) + str(run.data.params)
    finally:
        with engine.connect() as c:
            c.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
        engine.dispose()
