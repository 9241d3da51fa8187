#!/usr/bin/env bash
# Services the tests need, brought up before pytest (the README's test command and .ci/run run
# this first): a single-node SLURM cluster for `-m slurm`, PostgreSQL at 127.0.0.1:5432 for the
# storage and tracking-server tests, Chromium + ChromeDriver for the browser test of
# `bln-sweep ui`. Each is checked, started or installed when missing, and checked again; when
# any cannot be brought up this says which and why and exits 1, so CI never goes green with
# the tests that need it unrun (under CI=true the test suite also fails instead of skipping).
#   launchers/scripts/ci-services.sh     # ~10 s on a fresh machine, ~2 s when everything is up
#
# Settings (environment; the defaults are what CI uses):
#   CI_SERVICES_TIMEOUT_S=240   bound on slurm-up.sh
#   SLURM_UP=<here>/slurm-up.sh the script that starts (or checks) the cluster
#   BLN_PG_HOST=127.0.0.1 BLN_PG_PORT=5432   where the PostgreSQL tests connect
#   CHROMIUM=/usr/bin/chromium CHROMEDRIVER=/usr/bin/chromedriver   what the browser test runs
#   CI_SERVICES_INSTALL=1       0: never apt-get install a missing package
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
limit=${CI_SERVICES_TIMEOUT_S:-240}
slurm_up=${SLURM_UP:-$here/slurm-up.sh}
pg_host=${BLN_PG_HOST:-127.0.0.1}
pg_port=${BLN_PG_PORT:-5432}
chromium=${CHROMIUM:-/usr/bin/chromium}
chromedriver=${CHROMEDRIVER:-/usr/bin/chromedriver}
install=${CI_SERVICES_INSTALL:-1}
log=${SLURM_DIR:-/tmp/slurm-ci}-up.log
start=$(date +%s)
failed=()
say() { echo "[ci-services] $*"; }

can_install() { [ "$install" = 1 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; }

apt_install() {  # apt_install LOG PACKAGE...: Debian packages, never a browser download by a tool
  local out=$1
  shift
  timeout 300 sh -c "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $*" >"$out" 2>&1
}

# ---- Chromium and ChromeDriver -------------------------------------------------------------
if [ ! -x "$chromium" ] || [ ! -x "$chromedriver" ]; then
  if can_install; then
    apt_install "${log%.log}-chromium.log" chromium chromium-driver || true
  fi
fi
if [ -x "$chromium" ] && [ -x "$chromedriver" ]; then
  say "chromium: $("$chromium" --version 2>/dev/null | head -n 1)"
else
  failed+=("chromium: $chromium or $chromedriver missing (apt-get install chromium chromium-driver)")
fi

# ---- PostgreSQL ----------------------------------------------------------------------------
pg_up() { pg_isready -q -h "$pg_host" -p "$pg_port" -t 3 >/dev/null 2>&1; }
if ! command -v pg_isready >/dev/null 2>&1 && can_install; then
  apt_install "${log%.log}-postgresql.log" postgresql || true
fi
if command -v pg_isready >/dev/null 2>&1 && ! pg_up; then
  # installed but stopped: start every cluster this machine has (Debian's wrapper), then wait
  if command -v pg_lsclusters >/dev/null 2>&1; then
    pg_lsclusters -h 2>/dev/null | while read -r version name _; do
      pg_ctlcluster "$version" "$name" start >/dev/null 2>&1 || true
    done
  fi
  for _ in $(seq 1 20); do pg_up && break; sleep 0.5; done
fi
if command -v pg_isready >/dev/null 2>&1 && pg_up; then
  say "PostgreSQL answers at $pg_host:$pg_port"
else
  failed+=("PostgreSQL: nothing answers at $pg_host:$pg_port (postgresql installed and started?)")
fi

# ---- SLURM ---------------------------------------------------------------------------------
if [ "$(id -u)" != 0 ]; then  # slurm-up.sh needs root; a site cluster that answers will do
  if sinfo -h -o %T 2>/dev/null | grep -qE 'idle|mixed|alloc'; then
    say "SLURM: the cluster on PATH answers"
  else
    failed+=("SLURM: no cluster answers and starting one needs root")
  fi
elif timeout "$limit" "$slurm_up" >"$log" 2>&1; then
  say "SLURM up in $(($(date +%s) - start)) s: $(tail -n 1 "$log")"
else
  failed+=("SLURM: $slurm_up failed (exit $?, log $log): $(tail -n 1 "$log")")
fi

if [ ${#failed[@]} -gt 0 ]; then
  for f in "${failed[@]}"; do say "NOT UP: $f"; done
  say "the tests that need these would not run; fix the above (see README, Reliability)"
  exit 1
fi
say "all services up in $(($(date +%s) - start)) s"
