#!/usr/bin/env bash
# Stop what slurm-up.sh started, each daemon by the PID in its own pid file (never by name).
#   launchers/scripts/slurm-down.sh            # jobs are cancelled first
#   PURGE_STATE=1 launchers/scripts/slurm-down.sh   # also forget every job (rm -rf $SLURM_DIR)
# MariaDB is stopped only if slurm-up.sh started it; munged is left running unless
# STOP_MUNGE=1 (other software may use it). Safe to run when nothing is up.
SLURM_DIR=${SLURM_DIR:-/tmp/slurm-ci}
STOP_MUNGE=${STOP_MUNGE:-0}
alive() { [ -n "${1:-}" ] && ps -o stat= -p "$1" 2>/dev/null | grep -qv '^Z'; }  # zombies = gone
stop_pidfile() {
  local f=$1 pid
  [ -s "$f" ] || return 0
  pid=$(cat "$f")
  if alive "$pid"; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then kill -9 "$pid" 2>/dev/null || true; fi
  fi
  rm -f "$f"
}
# Cancel every job and let its steps end (KillWait=5) while slurmd is still up; otherwise
# orphaned slurmstepd processes outlive slurmd.
if command -v scontrol >/dev/null && scontrol ping >/dev/null 2>&1; then
  scancel --user="$(id -un)" 2>/dev/null || true
  for _ in $(seq 1 100); do [ -z "$(squeue -h -t R,CG,S 2>/dev/null)" ] && break; sleep 0.2; done
fi
stop_pidfile "$SLURM_DIR/slurmd.pid"
stop_pidfile "$SLURM_DIR/slurmctld.pid"
stop_pidfile "$SLURM_DIR/slurmdbd.pid"
if [ -e "$SLURM_DIR/mariadb.started-by-us" ]; then
  /etc/init.d/mariadb stop >/dev/null 2>&1 || true
  rm -f "$SLURM_DIR/mariadb.started-by-us"
fi
[ "$STOP_MUNGE" = 1 ] && stop_pidfile /run/munge/munged.pid
[ "${PURGE_STATE:-0}" = 1 ] && rm -rf "$SLURM_DIR"
echo "[slurm-down] done"
