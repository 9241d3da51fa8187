#!/usr/bin/env bash
# Services CI starts before pytest: a single-node SLURM cluster for the `slurm` tests
# (`pytest -m slurm`). Never fails the build: when the cluster cannot come up (not root, no
# apt-get, no network for the packages, ...) it says why and exits 0, and the slurm tests then
# skip with that reason while every other test still runs.
#   launchers/scripts/ci-services.sh     # ~10 s on a fresh machine, ~2 s when installed
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
limit=${CI_SERVICES_TIMEOUT_S:-90}
log=${SLURM_DIR:-/tmp/slurm-ci}-up.log
start=$(date +%s)
if [ "$(id -u)" != 0 ]; then
  echo "[ci-services] SLURM not started: needs root; slurm tests will skip"
  exit 0
fi
if timeout "$limit" "$here/slurm-up.sh" >"$log" 2>&1; then
  echo "[ci-services] SLURM up in $(($(date +%s) - start)) s: $(tail -n 1 "$log")"
else
  echo "[ci-services] SLURM not started (exit $?, log $log); slurm tests will skip:"
  tail -n 5 "$log" | sed 's/^/[ci-services]   /'
fi
exit 0
