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
        "bln_sweeps.cli",
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

    from bln_sweeps.sweep.manifest import load_manifest

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


def pg_admin():
    """A connection to the machine's PostgreSQL (CI starts one at 127.0.0.1:5432), or the
    service fixture's verdict: a skip on a user's machine, a failure under CI."""
    from tests.conftest import PG_ADMIN, service_missing

    psycopg = pytest.importorskip("psycopg")
    try:
        return psycopg.connect(PG_ADMIN, connect_timeout=3, autocommit=True)
    except psycopg.OperationalError as e:
        service_missing(f"no PostgreSQL at {PG_ADMIN}: {str(e).strip()}")


def dump_database(admin, db: str) -> bytes:
    """Every row of every table of database `db`, as text."""
    import psycopg

    from tests.conftest import PG_ADMIN

    with psycopg.connect(PG_ADMIN.rsplit("/", 1)[0] + f"/{db}", autocommit=True) as conn:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT quote_ident(table_name) FROM information_schema.tables "
                "WHERE table_schema = 'public'"
            )
        ]
        rows = [repr(row) for t in tables for row in conn.execute(f"SELECT * FROM {t}")]
    return "\n".join(rows).encode()


@pytest.mark.slow
def test_a_random_url_password_is_found_nowhere_but_in_the_private_file(tmp_path):
    """A sweep whose Optuna storage and MLflow store both sit on PostgreSQL behind a password
    full of URL-special characters (trust auth accepts any): every byte of the working and
    sweep directories, both databases and everything the commands printed is scanned for each
    random part of it. The one place it may be is credentials.json, mode 0600."""
    import stat
    from urllib.parse import quote

    parts = [uuid.uuid4().hex[:12] for _ in range(3)]
    password = f"{parts[0]}/{parts[1]}:@%?#&=+ '!{parts[2]}"
    in_url = quote(password, safe="/:")  # '/' and ':' stay raw: the case a regex missed
    admin = pg_admin()
    dbs = [f"leak_{uuid.uuid4().hex[:8]}" for _ in range(2)]
    for db in dbs:
        admin.execute(f'CREATE DATABASE "{db}"')
    server = f"postgresql://postgres:{in_url}@127.0.0.1:5432"
    outputs = []
    try:
        args = [
            "norm=layernorm",
            "sweep.grid={batch: b4}",
            "sweep.name=pw",
            "storage=postgres",
            f"storage.url={server}/{dbs[0]}",
            f"tracking.uri={server}/{dbs[1]}",
            "search.n_trials=1",
            "search.confirm_seeds=1",
            "search.pruner=none",
            "launcher.workers=1",
            *FAST,
        ]
        try:
            p = bln_sweep(*args, cwd=tmp_path)
        finally:
            stop_leftovers(str(tmp_path))
        outputs.append(p.stdout + p.stderr)
        assert p.returncode == 0, p.stdout + p.stderr
        assert "| layernorm" in p.stdout  # the table: bln-analyze found the real store
        report = cli("analysis", "pw", "--report", "report.html", cwd=tmp_path)
        for more in (bln_sweep("status", "pw", cwd=tmp_path), cli("analysis", "pw", cwd=tmp_path)):
            outputs.append(more.stdout + more.stderr)
            assert more.returncode == 0, more.stderr
        outputs.append(report.stdout + report.stderr)
        assert report.returncode == 0, report.stderr
        assert "1 trials: 1 complete" in (tmp_path / "report.html").read_text()  # read the studies
        private = tmp_path / "sweeps" / "pw" / "credentials.json"
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
        assert in_url.encode() in private.read_bytes()
        scanned = {
            "files": b"\n".join(
                f.read_bytes() for f in tmp_path.rglob("*") if f.is_file() and f != private
            ),
            "optuna store": dump_database(admin, dbs[0]),
            "mlflow store": dump_database(admin, dbs[1]),
            "output": "\n".join(outputs).encode(),
        }
        assert len(scanned["mlflow store"]) > 1000  # the runs really are there
        found = [
            (where, part)
            for where, data in scanned.items()
            for part in parts
            if part.encode() in data
        ]
        assert not found, f"password parts found in: {found}"
    finally:
        for db in dbs:
            admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        admin.close()


@pytest.mark.slow
def test_a_url_password_given_to_bln_train_is_found_nowhere(tmp_path):
    """`bln-train tracking.uri=postgresql://u:<password>@...`: the password used to land in the
    config.yaml artifact, the checkpoint and Hydra's .hydra/ files. Every file the run writes
    (checkpoint included: torch stores its pickle uncompressed), the MLflow database and the
    output are scanned for each random part of it."""
    from urllib.parse import quote

    parts = [uuid.uuid4().hex[:12] for _ in range(2)]
    password = f"{parts[0]}/:@?#{parts[1]}"
    admin = pg_admin()
    db = f"leak_{uuid.uuid4().hex[:8]}"
    admin.execute(f'CREATE DATABASE "{db}"')
    try:
        uri = f"postgresql://postgres:{quote(password, safe='/:')}@127.0.0.1:5432/{db}"
        p = cli(
            "bln_sweeps.cli",
            *["train.steps=4", "train.eval_interval=2", "eval.tokens=256", "seq.len=64"],
            *["data.n_train_tokens=20000", "data.n_val_tokens=4000", "train.checkpoint_interval=2"],
            f"tracking.uri={uri}",
            cwd=tmp_path,
        )
        assert p.returncode == 0, p.stderr
        written = sorted(str(f.relative_to(tmp_path)) for f in tmp_path.rglob("*") if f.is_file())
        assert any(f.endswith(".hydra/overrides.yaml") for f in written), written
        assert any(f.endswith("ckpt.pt") for f in written) and any(
            f.endswith("artifacts/config.yaml") for f in written
        ), written
        scanned = {
            "files": b"\n".join(f.read_bytes() for f in tmp_path.rglob("*") if f.is_file()),
            "mlflow store": dump_database(admin, db),
            "output": (p.stdout + p.stderr).encode(),
        }
        found = [
            (w, part) for w, data in scanned.items() for part in parts if part.encode() in data
        ]
        assert not found, f"password parts found in: {found}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        admin.close()
