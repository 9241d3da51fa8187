#!/usr/bin/env bash
# Bring up a real single-node SLURM cluster on this machine (Debian/Ubuntu, root, no systemd
# needed), so `bln-sweep launcher=slurm` and the `slurm` tests can run without a site cluster.
#
#   sudo launchers/scripts/slurm-up.sh          # ~10 s on a fresh machine, ~3 s when installed
#   sudo launchers/scripts/slurm-down.sh        # stop every daemon this script started
#
# What it runs: munged, slurmctld, slurmd and (WITH_DBD=1, the default) slurmdbd on MariaDB, so
# that `sacct` works: submitit polls job states with sacct, and without it a cancelled or killed
# job makes `job.result()` wait forever. Packages are installed with apt-get when missing.
# Idempotent: running it again on a healthy cluster only checks it.
#
# Settings (environment):
#   SLURM_DIR=/tmp/slurm-ci   state, spool, logs, pid files
#   WITH_DBD=1                0: no accounting; an squeue-based `sacct` stand-in goes to
#                             $SLURM_DIR/bin (put it first on PATH)
#   NODE_CPUS=8               may exceed the real core count (SlurmdParameters=config_overrides)
#   NODE_MEM_MB=16000         RealMemory of the node (what --mem is checked against)
#   NODE_GPUS=                e.g. 2: a gres gpu count backed by /dev/nvidia0..N-1 (off by default)
#   PARTITION=debug           the default partition, MaxTime=$MAX_TIME
#   MAX_TIME=INFINITE         its time limit (minutes, or a SLURM time)
#   SHORT_MAX_TIME=30         a second partition `short` on the same node with this MaxTime
#   CLUSTER=ci                the accounting cluster name
#   SLURMCTLD_ARGS=           -c: cold start that forgets old jobs
set -euo pipefail

SLURM_DIR=${SLURM_DIR:-/tmp/slurm-ci}
WITH_DBD=${WITH_DBD:-1}
NODE_CPUS=${NODE_CPUS:-8}
NODE_MEM_MB=${NODE_MEM_MB:-16000}
NODE_GPUS=${NODE_GPUS:-}
PARTITION=${PARTITION:-debug}
MAX_TIME=${MAX_TIME:-INFINITE}
SHORT_MAX_TIME=${SHORT_MAX_TIME:-30}
CLUSTER=${CLUSTER:-ci}
HOST=$(hostname -s)
log() { echo "[slurm-up] $*"; }
die() { echo "[slurm-up] error: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (it installs packages and starts daemons)"

# ---- slurm.conf ---------------------------------------------------------------------------
if [ "$WITH_DBD" = 1 ]; then
  ACCT="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30"
else
  ACCT="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi
GRES_NODE="" GRES_TYPES=""
if [ -n "$NODE_GPUS" ] && [ "$NODE_GPUS" -gt 0 ]; then
  GRES_TYPES="GresTypes=gpu"
  GRES_NODE="Gres=gpu:$NODE_GPUS"
fi
conf=$(cat <<EOF
# written by launchers/scripts/slurm-up.sh
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job waits cred_expire seconds before it restarts (default 120)
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
ReturnToService=2
# seconds between SIGTERM and SIGKILL on cancel, requeue and time limit (default 30)
KillWait=5
# CPUs may exceed the real core count
SlurmdParameters=config_overrides
# finished jobs stay visible to squeue/scontrol for a day (the sacct stand-in relies on it)
MinJobAge=86400
SlurmctldPidFile=$SLURM_DIR/slurmctld.pid
SlurmdPidFile=$SLURM_DIR/slurmd.pid
StateSaveLocation=$SLURM_DIR/state
SlurmdSpoolDir=$SLURM_DIR/spool
SlurmctldLogFile=$SLURM_DIR/log/slurmctld.log
SlurmdLogFile=$SLURM_DIR/log/slurmd.log
JobCompType=jobcomp/none
$GRES_TYPES
$ACCT
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$NODE_CPUS RealMemory=$NODE_MEM_MB $GRES_NODE State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=$MAX_TIME State=UP
PartitionName=short Nodes=$HOST Default=NO MaxTime=$SHORT_MAX_TIME State=UP
EOF
)
# fast path: the same slurm.conf, daemons up, node idle -> nothing to do
if [ "$(cat /etc/slurm/slurm.conf 2>/dev/null || true)" = "$conf" ] \
  && command -v sinfo >/dev/null && scontrol ping >/dev/null 2>&1; then
  st=$(sinfo -h -n "$HOST" -o %T 2>/dev/null || true)
  case "$st" in
    idle|mixed|allocated)
      if [ "$WITH_DBD" != 1 ] || sacct -n -X -S now >/dev/null 2>&1; then
        log "already up (node $HOST: $st)"
        exit 0
      fi ;;
  esac
fi

# ---- packages -----------------------------------------------------------------------------
export DEBIAN_FRONTEND=noninteractive
pkgs="slurmctld slurmd slurm-client munge"
[ "$WITH_DBD" = 1 ] && pkgs="$pkgs slurmdbd mariadb-server"
missing=""
for p in $pkgs; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  command -v apt-get >/dev/null || die "missing packages:$missing (and no apt-get to install them)"
  log "installing:$missing"
  apt-get update -qq >/dev/null
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
fi

mkdir -p "$SLURM_DIR"/{state,spool,log,bin}
alive() { [ -n "${1:-}" ] && ps -o stat= -p "$1" 2>/dev/null | grep -qv '^Z'; }  # zombies = gone
running() { [ -s "$1" ] && alive "$(cat "$1")"; }

# ---- munge --------------------------------------------------------------------------------
[ -s /etc/munge/munge.key ] || runuser -u munge -- mungekey -c
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged   # daemonizes; pid in /run/munge/munged.pid
  for _ in $(seq 1 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi
munge -n | unmunge >/dev/null || die "munge does not work"

conf_changed=0
if [ -n "$GRES_NODE" ]; then
  for i in $(seq 0 $((NODE_GPUS - 1))); do echo "NodeName=$HOST Name=gpu File=/dev/nvidia$i"; done \
    > /etc/slurm/gres.conf
fi
if [ "$(cat /etc/slurm/slurm.conf 2>/dev/null || true)" != "$conf" ]; then
  printf '%s\n' "$conf" > /etc/slurm/slurm.conf
  conf_changed=1
fi

# ---- accounting: MariaDB + slurmdbd --------------------------------------------------------
if [ "$WITH_DBD" = 1 ]; then
  if ! mariadb-admin ping >/dev/null 2>&1; then
    /etc/init.d/mariadb start >/dev/null
    touch "$SLURM_DIR/mariadb.started-by-us"   # slurm-down.sh stops only a MariaDB we started
  fi
  mariadb -uroot -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  cat > /etc/slurm/slurmdbd.conf <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
LogFile=$SLURM_DIR/log/slurmdbd.log
PidFile=$SLURM_DIR/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
EOF
  chmod 600 /etc/slurm/slurmdbd.conf
  running "$SLURM_DIR/slurmdbd.pid" || slurmdbd
  for _ in $(seq 1 100); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.2; done
  sacctmgr -n list cluster format=cluster | grep -qw "$CLUSTER" \
    || sacctmgr -i add cluster "$CLUSTER" >/dev/null
else
  cat > "$SLURM_DIR/bin/sacct" <<'EOF'
#!/bin/bash
# sacct stand-in for a cluster without slurmdbd. Answers only what submitit asks:
#   sacct -o JobID,State,NodeList --parsable2 -j ID [-j ID ...]
ids=()
while [ $# -gt 0 ]; do
  case "$1" in
    -j|--jobs) ids+=(${2//,/ }); shift 2 ;;
    --jobs=*) v=${1#--jobs=}; ids+=(${v//,/ }); shift ;;
    *) shift ;;
  esac
done
echo "JobID|State|NodeList"
for id in "${ids[@]}"; do
  squeue -h -r -t all -j "$id" -o "%i|%T|%N" 2>/dev/null || true
done
EOF
  chmod +x "$SLURM_DIR/bin/sacct"
fi

# ---- controller + node daemon --------------------------------------------------------------
if running "$SLURM_DIR/slurmctld.pid"; then
  [ "$conf_changed" = 1 ] && scontrol reconfigure >/dev/null 2>&1 || true
else
  # shellcheck disable=SC2086
  slurmctld ${SLURMCTLD_ARGS:-}
fi
running "$SLURM_DIR/slurmd.pid" || slurmd
st=""
for _ in $(seq 1 150); do
  st=$(sinfo -h -n "$HOST" -o %T 2>/dev/null || true)
  case "$st" in
    idle|mixed|allocated) break ;;
    *drain*|inval|down*) scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
  esac
  sleep 0.2
done
case "$st" in
  idle|mixed|allocated) ;;
  *) sinfo -R >&2 || true; tail -n 20 "$SLURM_DIR"/log/*.log >&2 || true
     die "node $HOST is '${st:-unreachable}', not idle" ;;
esac
srun -N1 -n1 -t 1 true
log "ready: partition $PARTITION, node $HOST ($NODE_CPUS CPUs, ${NODE_MEM_MB} MB)," \
  "accounting $([ "$WITH_DBD" = 1 ] && echo slurmdbd || echo "none: PATH=$SLURM_DIR/bin:\$PATH")"
