#!/usr/bin/env bash
# Services CI starts before pytest: a single-node SLURM cluster for the `slurm` tests
# (`pytest -m slurm`) and Chromium for the browser test. Never fails the build: when a service
# cannot come up (not root, no apt-get, no network for the packages, ...) it says why and exits
# 0, and the tests that need it skip with that reason while every other test still runs.
#   launchers/scripts/ci-services.sh     # ~10 s on a fresh machine, ~2 s when installed
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
limit=${CI_SERVICES_TIMEOUT_S:-240}
log=${SLURM_DIR:-/tmp/slurm-ci}-up.log
start=$(date +%s)
if [ "$(id -u)" != 0 ]; then
  echo "[ci-services] SLURM not started: needs root; slurm tests will skip"
  exit 0
fi
# Debian's Chromium and ChromeDriver for the browser test of `bln-sweep ui` (never a browser
# download by a test tool).
if ! command -v chromedriver >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  if timeout 300 sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver' >"${log%.log}-chromium.log" 2>&1; then
    echo "[ci-services] chromium installed: $(chromium --version 2>/dev/null)"
  else
    echo "[ci-services] chromium not installed (log ${log%.log}-chromium.log); the browser test will skip"
  fi
fi
if timeout "$limit" "$here/slurm-up.sh" >"$log" 2>&1; then
  echo "[ci-services] SLURM up in $(($(date +%s) - start)) s: $(tail -n 1 "$log")"
else
  echo "[ci-services] SLURM not started (exit $?, log $log); slurm tests will skip:"
  tail -n 5 "$log" | sed 's/^/[ci-services]   /'
fi
exit 0
