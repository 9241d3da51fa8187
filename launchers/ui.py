"""`bln-sweep ui NAME`: the MLflow UI on one sweep's tracking store.

    bln-sweep ui                       # the default sweep (sweep.name in conf/sweep.yaml)
    bln-sweep ui NAME                  # http://127.0.0.1:5000 (or a free port), Ctrl-C stops it
    bln-sweep ui NAME --port 5001
    bln-sweep ui NAME --host 0.0.0.0   # every interface; the UI has no authentication

An embedded sweep (SQLite) or a database tracking URI gets its own `mlflow server` in the
foreground. A sweep tracked on an MLflow server (http(s)) is already browsable there: the server
is checked and the sweep's URL on it printed. Either way the sweep's experiment gets a saved view
"bln sweep" (headline metric, norm, batch, seq, lr first, best run on top) and its link is
printed: MLflow has no per-experiment default columns, but it opens a saved view from a link.

Torch-free and light: mlflow is imported only once the input has been checked.
"""

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

USAGE = "usage: bln-sweep ui [NAME] [--port PORT] [--host HOST]"
DEFAULT_PORT = 5000  # MLflow's own default, so a second UI moves to a free port
VIEW_ID = "bln-sweep"  # the saved view's key: `?viewStateShareKey=bln-sweep`
VIEW_NAME = "bln sweep"
# The UI stores saved views (MLflow 3.15+) and shared links as experiment tags with this prefix.
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
REACH_TIMEOUT_S = 3.0  # a tracking server that does not answer /health in this long is down
START_TIMEOUT_S = 180.0  # `mlflow server` takes 5-30 s to answer on a busy 2-core machine


class InputError(Exception):
    """Bad input: one line on stderr, exit code 2."""


def fail(message: str) -> int:
    from bln_sweeps.credentials import mask_text

    print(f"bln-sweep ui: error: {mask_text(message)}", file=sys.stderr)  # no URL password
    return 2


def parse(argv: list[str]) -> tuple[str | None, int | None, str]:
    name, port, host = None, None, "127.0.0.1"
    args = list(argv)
    while args:
        arg = args.pop(0)
        flag, eq, value = arg.partition("=")
        if flag in ("--port", "--host"):
            if not eq:
                if not args:
                    raise InputError(f"{flag} needs a value; {USAGE}")
                value = args.pop(0)
            if flag == "--host":
                host = value
            else:
                try:
                    port = int(value)
                except ValueError:
                    raise InputError(f"--port {value!r} is not a number; {USAGE}") from None
                if not 0 < port < 65536:
                    raise InputError(f"--port {port} is not in 1..65535")
        elif arg.startswith("-"):
            raise InputError(f"unknown flag {arg}; valid flags: --port, --host, --help")
        elif name is None:
            name = arg
        else:
            raise InputError(f"one sweep name, not {name!r} and {arg!r}; {USAGE}")
    return name, port, host


def is_loopback(host: str) -> bool:
    """True if every address `host` resolves to is a loopback address (127.0.0.0/8, ::1)."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror as e:
        raise InputError(f"--host {host!r}: cannot resolve it ({e.strerror})") from None
    return all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def find_sweep(name: str | None) -> Path:
    """The sweep directory `<sweep.dir>/<name>` (default: `sweep.name`), as `bln-sweep` made it."""
    from bln_sweeps.config import ConfigError
    from bln_sweeps.names import check_name
    from launchers.plan import sweep_config

    cfg = sweep_config([]).sweep
    root, name = Path(cfg.dir), name or cfg.name
    sweep_dir = root / name
    known = sorted(p.parent.name for p in root.glob("*/manifest.json"))
    try:
        check_name("NAME", name)
    except ConfigError as e:
        raise InputError(f"{e}; sweeps: {', '.join(known) or 'none'}") from None
    if not (sweep_dir / "manifest.json").exists():
        raise InputError(f"no sweep {name!r} in {root}/; sweeps: {', '.join(known) or 'none'}")
    return sweep_dir.resolve()


def read_manifest(sweep_dir: Path) -> dict:
    """The sweep's manifest, real URLs included; a damaged one is bad input, not a traceback."""
    from bln_sweeps.sweep.manifest import load_manifest

    try:
        manifest = load_manifest(sweep_dir)
        manifest["tracking_uri"], manifest["sweep"]
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{sweep_dir / 'manifest.json'} is not a sweep manifest ({e})") from None
    return manifest


def port_free(host: str, port: int) -> bool:
    # SO_REUSEADDR as uvicorn sets it: a port with only TIME_WAIT connections is free for it.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def pick_port(host: str, port: int | None) -> int:
    if port is not None:
        if not port_free(host, port):
            raise InputError(f"port {port} on {host} is in use; pick another with --port")
        return port
    if port_free(host, DEFAULT_PORT):
        return DEFAULT_PORT
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:  # one the OS says is free now
        s.bind((host, 0))
        return s.getsockname()[1]


def check_store(uri: str) -> None:
    """The tracking store answers, quickly; MlflowClient itself retries for minutes."""
    from bln_sweeps.tracking.uri import SERVER_SCHEMES, check_server, sqlite_path

    if uri.startswith(SERVER_SCHEMES):
        try:
            check_server(uri, REACH_TIMEOUT_S)
        except ValueError as e:
            raise InputError(str(e)) from None
        return
    db = sqlite_path(uri)
    if db is not None:
        if not db.is_file():
            raise InputError(f"tracking store {uri}: no such file")
        with open(db, "rb") as f:  # MLflow would try to migrate a damaged file in place
            if f.read(16) != b"SQLite format 3\x00":
                raise InputError(f"tracking store {db} is not an SQLite database")
        return
    try:
        import sqlalchemy

        with sqlalchemy.create_engine(uri, connect_args={"connect_timeout": 5}).connect():
            return
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(f"tracking store {uri} is unreachable: {first}") from None


def view_state(metric: str) -> dict:
    """The runs table a sweep opens on: headline metric and key params first, best run on top.

    Keys as the MLflow UI writes them: a column is `<type>.`<key>``, the table's state is its
    search facets plus its UI state (mlflow/server/js: experiment-page state, 3.15+).
    """
    from bln_sweeps.tracking.contract import LEAKY_TAG, STATUS_TAG, TRIAL_TAG

    columns = [
        f"metrics.`{metric}`",
        "params.`norm.name`",
        "params.`batch.size`",
        "params.`seq.len`",
        "params.`optim.lr`",
        f"tags.`{LEAKY_TAG}`",
        f"tags.`{STATUS_TAG}`",
    ]
    return {
        "orderByKey": f"metrics.`{metric}`",
        "orderByAsc": True,
        # trial and confirm runs only, flat: the sweep and cell parent runs carry no metrics
        "searchFilter": f"tags.`{TRIAL_TAG}` IS NOT NULL",
        "selectedColumns": columns,
        "columnOrder": columns,
        "runsHiddenMode": "SHOW_ALL",  # charts show every run of the sweep, not the first 10
    }


def save_view(client, experiment_id: str, metric: str) -> None:
    """Store the sweep's view in its experiment, as the UI's "Save view" does (overwritten on
    each start, so a new release of this module updates it)."""
    now = int(time.time() * 1000)
    envelope = {
        "name": VIEW_NAME,
        "createdAt": now,
        "updatedAt": now,
        "state": json.dumps(view_state(metric)),
    }
    client.set_experiment_tag(experiment_id, VIEW_TAG_PREFIX + VIEW_ID, json.dumps(envelope))
    # Runs, not the GenAI tabs: the UI asks which kind an experiment is until this tag is set.
    client.set_experiment_tag(experiment_id, "mlflow.experimentKind", "custom_model_development")


def prepare_experiment(uri: str, sweep: str, metric: str) -> str:
    from bln_sweeps.tracking import tracking_client
    from bln_sweeps.tracking.contract import metric_key

    client = tracking_client(uri)
    exp = client.get_experiment_by_name(sweep)
    if exp is None:
        raise InputError(f"tracking store {uri} has no experiment {sweep!r}")
    save_view(client, exp.experiment_id, metric_key(metric))
    return exp.experiment_id


def urls(base: str, experiment_id: str) -> tuple[str, str]:
    """The experiment's runs (nested sweep -> cell -> trial) and its "bln sweep" view (flat).

    `workflowType=machine_learning` opens the "Model training" side of the UI: MLflow 3.17
    otherwise lands on its GenAI overview, which shows traces, not runs.
    """
    experiment = f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    view = f"{experiment}&viewStateShareKey={VIEW_ID}&compareRunsMode=TABLE"
    return experiment, view


def server_command(uri: str, host: str, port: int, sweep_dir: Path) -> list[str]:
    cmd = [
        *(sys.executable, "-m", "mlflow", "server"),
        *("--backend-store-uri", uri),
        *("--host", host, "--port", str(port)),
        *("--workers", "1"),  # one person browsing; each worker is a full MLflow process
        # artifacts the UI uploads or proxies stay with the sweep, not in the current directory
        *("--artifacts-destination", str(sweep_dir / "mlartifacts")),
    ]
    if not is_loopback(host):
        # MLflow 3 answers 403 to Host headers other than localhost and private IPs; a user
        # who binds another interface reaches it by this machine's name or address.
        cmd += ["--allowed-hosts", ",".join(allowed_hosts(host, port))]
    return cmd


def allowed_hosts(host: str, port: int) -> list[str]:
    """The Host headers the UI answers when bound beyond loopback: this machine's names and
    addresses, bare and with the port, spelled out. No wildcard: MLflow matches entries with
    '*' by fnmatch, so `10.*` would also admit a DNS name like `10.attacker.example` (DNS
    rebinding), and `name:*` any text after the colon."""
    names = {socket.gethostname(), socket.getfqdn(), "localhost", "127.0.0.1", "::1"}
    if host not in ("0.0.0.0", "::"):
        names.add(host)
    for name in list(names):
        try:
            names.update(i[4][0].split("%")[0] for i in socket.getaddrinfo(name, None))
        except OSError:
            continue
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:  # the address of the default route (a UDP connect sends nothing)
            s.connect(("10.255.255.255", 1))
            names.add(s.getsockname()[0])
        except OSError:
            pass
    spelled = {f"[{n}]" if ":" in n else n for n in names if n}
    return sorted(spelled | {f"{n}:{port}" for n in spelled})


def wait_ready(proc: subprocess.Popen, base: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
            last = lines[-1].strip() if lines else f"exit code {proc.returncode}"
            raise RuntimeError(f"mlflow server stopped: {last} (log {log})")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=REACH_TIMEOUT_S):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.3)
    raise RuntimeError(f"mlflow server did not answer in {START_TIMEOUT_S:.0f} s (log {log})")


def stop(proc: subprocess.Popen) -> None:
    """Stop the server's whole process group: `mlflow server` runs uvicorn as a child."""
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def serve(uri: str, host: str, port: int, sweep_dir: Path, experiment_id: str) -> int:
    log = sweep_dir / "mlflow-ui.log"
    env = {
        **os.environ,
        # The GenAI job runner (a huey consumer pool) is of no use for browsing runs.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    every = host in ("0.0.0.0", "::")  # all interfaces: others use this machine's name
    shown = socket.gethostname() if every else host
    local = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # where this process asks
    base, probe = (f"http://{f'[{h}]' if ':' in h else h}:{port}" for h in (shown, local))
    print(f"starting the MLflow UI on {host}:{port} (log {log})", flush=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            server_command(uri, host, port, sweep_dir),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group, stopped as a whole
        )

    def terminate(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    try:
        try:
            wait_ready(proc, probe, log)
        except RuntimeError as e:
            print(f"bln-sweep ui: error: {e}", file=sys.stderr)
            return 1
        experiment, view = urls(base, experiment_id)
        print(f"MLflow UI: {base}  (Ctrl-C stops it)")
        print(f"experiment: {experiment}")
        print(f"sweep view: {view}", flush=True)
        if is_loopback(host):
            print(f"from another machine: ssh -N -L {port}:127.0.0.1:{port} {socket.gethostname()}")
        proc.wait()
        return 0 if proc.returncode == 0 else 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop(proc)


def run(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(__doc__.split("\n\n")[1])
        return 0
    try:
        name, port, host = parse(argv)
        loopback = is_loopback(host)
        sweep_dir = find_sweep(name)
        manifest = read_manifest(sweep_dir)
        uri = manifest["tracking_uri"]
        from bln_sweeps.tracking.contract import VAL_LOSS

        metric = manifest.get("search", {}).get("metric", VAL_LOSS)
        remote = uri.startswith(("http://", "https://"))
        if not remote and not loopback:
            print(
                f"bln-sweep ui: warning: --host {host} serves the MLflow UI beyond this machine; "
                "it has no authentication: anyone who reaches the port can read, edit and "
                "delete every run",
                file=sys.stderr,
                flush=True,
            )
        if not remote:
            port = pick_port(host, port)
        check_store(uri)
        try:
            experiment_id = prepare_experiment(uri, manifest["sweep"], metric)
        except InputError:
            raise
        except Exception as e:  # a damaged store (not a database, wrong schema): one line
            first = (str(e).strip().splitlines() or [""])[0]
            reason = f"{type(e).__name__}: {first}"
            raise InputError(f"tracking store {uri} cannot be read: {reason}") from None
    except InputError as e:
        return fail(str(e))
    if remote:
        experiment, view = urls(uri.rstrip("/"), experiment_id)
        print(f"sweep {manifest['sweep']!r} is tracked on {uri}, which serves the UI:")
        if port is not None or not loopback:
            print("(--port and --host apply to a UI this command starts; none is needed here)")
        print(f"experiment: {experiment}")
        print(f"sweep view: {view}")
        return 0
    return serve(uri, host, port, sweep_dir, experiment_id)


def main() -> None:
    sys.exit(run(sys.argv[1:]))
