#!/usr/bin/env bash
# Cluster mode: an MLflow tracking server with a PostgreSQL backend store and an artifact
# destination, and a second database on the same PostgreSQL for Optuna. SQLite on a network
# filesystem locks up under many workers, and MLflow 3.13+ refuses the old file store.
#
#   launchers/scripts/mlflow-server.sh [--pg postgresql://USER@HOST:5432] [--db bln]
#       [--host 127.0.0.1] [--port 5000] [--artifacts DIR] [--workers 4]
#
# Creates the databases DB (MLflow) and DB_optuna (Optuna) when missing; they are separate
# because both keep their schema version in a table named alembic_version. Then starts the
# server, waits until it answers, prints the bln-sweep overrides that use both, and stays in the
# foreground until Ctrl-C or SIGTERM. --pg must be reachable from every worker, and so must the
# server: on a cluster use --host 0.0.0.0 (the server has no authentication; keep it inside the
# cluster network) and --pg with the database host's name. Artifacts go through the server
# (--artifacts-destination), so workers need no shared filesystem for them.
set -euo pipefail

pg=${BLN_PG_URL:-postgresql://postgres@127.0.0.1:5432}
db=bln
host=127.0.0.1
port=5000
artifacts=$PWD/mlartifacts
workers=4
usage="usage: mlflow-server.sh [--pg URL] [--db NAME] [--host HOST] [--port PORT] [--artifacts DIR] [--workers N]"
while [ $# -gt 0 ]; do
  case $1 in
    --pg | --db | --host | --port | --artifacts | --workers)
      [ $# -ge 2 ] || { echo "mlflow-server.sh: error: $1 needs a value; $usage" >&2; exit 2; }
      declare "${1#--}=$2"
      shift 2
      ;;
    -h | --help) echo "$usage"; exit 0 ;;
    *) echo "mlflow-server.sh: error: unknown argument $1; $usage" >&2; exit 2 ;;
  esac
done
# The names go into CREATE DATABASE unquoted by any driver: keep them to plain identifiers.
if ! [[ $db =~ ^[a-z_][a-z0-9_]{0,50}$ ]]; then
  echo "mlflow-server.sh: error: --db '$db': use lower-case letters, digits and _" >&2
  exit 2
fi
pg=${pg%/}

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x "$root/.venv/bin/python" ]; then py=$root/.venv/bin/python; else py=python3; fi
fi

# Create the databases through the project's own driver (psycopg, the `postgres` extra, which
# SQLAlchemy 2.1 uses for postgresql:// URLs): no psql client needed on the node.
"$py" - "$pg" "$db" "${db}_optuna" <<'EOF' || exit 2
import sys

import sqlalchemy

base, *names = sys.argv[1:]
try:
    engine = sqlalchemy.create_engine(
        f"{base}/postgres", isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5}
    )
    with engine.connect() as c:
        for name in names:
            exists = c.execute(
                sqlalchemy.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}
            ).first()
            if not exists:
                c.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
                print(f"created database {name}")
except ImportError as e:
    sys.exit(f"mlflow-server.sh: error: {e}; install the driver: pip install -e '.[postgres]'")
except Exception as e:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    sys.exit(f"mlflow-server.sh: error: PostgreSQL at {base}: {first}")
EOF

mkdir -p "$artifacts"
artifacts=$(cd "$artifacts" && pwd)  # absolute: the server resolves it in its own directory
extra=()
shown=$host
if [ "$host" != 127.0.0.1 ] && [ "$host" != localhost ] && [ "$host" != ::1 ]; then
  echo "mlflow-server.sh: warning: --host $host: the MLflow server has no authentication;" \
    "anyone who reaches port $port can read, edit and delete every run" >&2
  name=${HOSTNAME:-$(hostname)}
  fqdn=$(hostname -f 2>/dev/null || echo "$name")
  [ "$host" = 0.0.0.0 ] && shown=$fqdn
  # MLflow 3 answers 403 to Host headers other than localhost and private IPs unless listed.
  allowed="localhost,localhost:*,127.0.0.1,127.0.0.1:*,$name,$name:*,$fqdn,$fqdn:*"
  extra=(--allowed-hosts "$allowed,$host,$host:*,10.*,192.168.*,172.*")
fi

# The GenAI job runner (a pool of huey consumers) does nothing for training runs.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
# Its own process group (setsid), so that stopping it stops uvicorn and its workers too.
setsid "$py" -m mlflow server \
  --backend-store-uri "$pg/$db" \
  --artifacts-destination "$artifacts" \
  --host "$host" --port "$port" --workers "$workers" ${extra[@]+"${extra[@]}"} &
server=$!
trap 'kill -TERM -- -"$server" 2>/dev/null; wait "$server" 2>/dev/null' EXIT
trap 'exit 0' INT TERM

uri=http://$shown:$port
case $host in  # where this script asks; an IPv6 literal goes in brackets
  0.0.0.0 | 127.0.0.1) local_uri=http://127.0.0.1:$port ;;
  :: | ::1) local_uri=http://[::1]:$port ;;
  *:*) local_uri=http://[$host]:$port ;;
  *) local_uri=http://$host:$port ;;
esac
# Wait until it answers (5-30 s: it creates or migrates its tables first).
# In the background: bash runs a trap only once its foreground command ends, `wait` at once.
"$py" - "$local_uri/health" "$server" <<'EOF' &
import os
import sys
import time
import urllib.request

url, pid = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 300
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("mlflow-server.sh: error: the MLflow server stopped; its output is above")
    try:
        urllib.request.urlopen(url, timeout=3).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.5)
sys.exit(f"mlflow-server.sh: error: no answer from {url} in 300 s")
EOF
wait $! || exit 1

echo "MLflow tracking server: $uri (backend $pg/$db, artifacts $artifacts); Ctrl-C stops it"
echo "bln-sweep overrides:"
echo "  tracking=server tracking.uri=$uri storage=postgres storage.url=$pg/${db}_optuna"
echo "or in the environment: MLFLOW_TRACKING_URI=$uri BLN_OPTUNA_URL=$pg/${db}_optuna"
wait "$server"
