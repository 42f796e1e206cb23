#!/usr/bin/env bash
# A real, local SLURM 22.05 cluster (Debian packages) with several emulated nodes on this host,
# for testing slurm/*.sbatch. Needs root (it runs munged as the munge user and maps the node
# names to 127.0.0.1 in /etc/hosts). Everything else lives under one folder.
#
#   scripts/slurm_cluster.sh up       # install if needed, start, wait until the nodes are idle
#   scripts/slurm_cluster.sh status   # nodes and queue
#   scripts/slurm_cluster.sh down     # cancel jobs, stop the daemons, remove the folder
#   eval "$(scripts/slurm_cluster.sh up)"   # exports SLURM_CONF for sbatch/squeue/scontrol
#
# `up` and `down` are idempotent: `up` on a running cluster only prints SLURM_CONF.
# Only the last line of `up`/`status` goes to stdout (`export SLURM_CONF=...`); logs go to stderr.
#
# Environment (defaults):
#   DERADIFF_SLURM_DIR=/tmp/deradiff-slurm  state, spool, logs, pid files, munge key and socket
#   DERADIFF_SLURM_NODES=2                  emulated nodes, named dd1..ddN
#   DERADIFF_SLURM_CPUS=8                   CPUs each node offers (oversubscribes the host, so that
#                                           several test jobs run at once; all nodes share its cores)
#   DERADIFF_SLURM_PORT=6817                slurmctld port; node i listens on PORT+i
#   DERADIFF_SLURM_INSTALL=1                apt-get install the packages if missing (0: fail instead)
#
# Exit status: 0 ok, 3 cannot run here (not root, no apt, packages missing), 1 failed to start.
# Why each setting (cgroups unavailable in containers, munge as its own user, ...): see
# slurm/README.md, "Testing on a local cluster".
set -euo pipefail

DIR="${DERADIFF_SLURM_DIR:-/tmp/deradiff-slurm}"
NODES="${DERADIFF_SLURM_NODES:-2}"
PORT="${DERADIFF_SLURM_PORT:-6817}"
PREFIX=dd
CONF="$DIR/slurm.conf"
HOSTS_TAG="# deradiff-slurm-cluster"
PACKAGES=(slurmctld slurmd slurm-client munge)

log() { echo "slurm_cluster: $*" >&2; }
die() { log "error: $1"; exit "${2:-1}"; }

node_names() { local i; for ((i = 1; i <= NODES; i++)); do echo "$PREFIX$i"; done; }

alive() { [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

ensure_installed() {
  local missing=0 bin
  for bin in slurmctld slurmd sbatch munged; do command -v "$bin" >/dev/null || missing=1; done
  ((missing)) || return 0
  [[ "${DERADIFF_SLURM_INSTALL:-1}" == 1 ]] || die "SLURM/munge not installed and DERADIFF_SLURM_INSTALL=0" 3
  command -v apt-get >/dev/null || die "SLURM/munge not installed and no apt-get to install them" 3
  log "installing ${PACKAGES[*]} (apt-get)"
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${PACKAGES[@]}"; } >"/tmp/deradiff-slurm-apt.log" 2>&1; then
    die "apt-get install ${PACKAGES[*]} failed (see /tmp/deradiff-slurm-apt.log)" 3
  fi
}

write_hosts() {
  # In place (not sed -i): /etc/hosts is often a bind mount that cannot be replaced.
  grep -q "$HOSTS_TAG" /etc/hosts 2>/dev/null && return 0
  echo "127.0.0.1 $(node_names | tr '\n' ' ')$HOSTS_TAG" >>/etc/hosts
}

remove_hosts() {
  grep -q "$HOSTS_TAG" /etc/hosts 2>/dev/null || return 0
  local kept
  kept="$(grep -v "$HOSTS_TAG" /etc/hosts)"
  printf '%s\n' "$kept" >/etc/hosts
}

write_conf() {
  local hw host i
  # CPUs, Boards, Sockets, Cores, Threads, RealMemory of this host, as slurmd sees them.
  # RealMemory of this host as slurmd sees it; CPUs as asked (SlurmdParameters=config_overrides
  # lets a node claim more than the hardware).
  hw="CPUs=${DERADIFF_SLURM_CPUS:-8} $(slurmd -C | sed -n 's/.*\(RealMemory=[0-9]*\).*/\1/p')"
  host="$(hostname -s)"
  cat >"$CONF.tmp" <<EOF
# Written by scripts/slurm_cluster.sh: a test cluster of $NODES emulated nodes on $host.
ClusterName=deradiff
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket.2
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
# No cgroups in containers: track processes through /proc, no task binding, no accounting.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmdParameters=config_overrides
MailProg=/bin/true
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
EOF
  for ((i = 1; i <= NODES; i++)); do
    echo "NodeName=$PREFIX$i NodeAddr=127.0.0.1 Port=$((PORT + i)) $hw State=UNKNOWN" >>"$CONF.tmp"
  done
  echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >>"$CONF.tmp"
  mv "$CONF.tmp" "$CONF"
}

start_munge() {
  alive "$DIR/munge/private/munged.pid" && return 0
  install -d -o munge -g munge -m 0755 "$DIR/munge"
  install -d -o munge -g munge -m 0700 "$DIR/munge/private"
  if [[ ! -s "$DIR/munge/private/munge.key" ]]; then
    head -c 1024 /dev/urandom >"$DIR/munge/private/munge.key"
    chown munge:munge "$DIR/munge/private/munge.key"
    chmod 0400 "$DIR/munge/private/munge.key"
  fi
  # munged refuses to run as root ("Logfile is insecure"): run it as its own user.
  runuser -u munge -- munged --socket="$DIR/munge/munge.socket.2" \
    --key-file="$DIR/munge/private/munge.key" --pid-file="$DIR/munge/private/munged.pid" \
    --log-file="$DIR/munge/private/munged.log" --seed-file="$DIR/munge/private/munged.seed" \
    || die "munged did not start (see $DIR/munge/private/munged.log)"
}

wait_idle() {
  local deadline=$((SECONDS + 60)) states
  while ((SECONDS < deadline)); do
    states="$(sinfo -h -N -o '%T' 2>/dev/null | sort -u | tr '\n' ' ')"
    [[ "$states" == "idle " || "$states" =~ ^(idle|mixed|allocated)( (idle|mixed|allocated))*\ $ ]] \
      && [[ "$(sinfo -h -N -o '%N' 2>/dev/null | wc -l)" -ge "$NODES" ]] && return 0
    sleep 0.3
  done
  sinfo -N >&2 || true
  die "nodes not idle after 60 s (logs: $DIR/log)"
}

cmd_up() {
  [[ "$(id -u)" == 0 ]] || die "needs root (munged as the munge user, /etc/hosts entries)" 3
  ensure_installed
  export SLURM_CONF="$CONF"
  local started=$SECONDS name
  mkdir -p "$DIR"/{state,spool,run,log}
  [[ -f "$CONF" ]] || write_conf
  write_hosts
  start_munge
  alive "$DIR/run/slurmctld.pid" || slurmctld -f "$CONF" || die "slurmctld did not start (see $DIR/log/slurmctld.log)"
  while read -r name; do
    alive "$DIR/run/slurmd-$name.pid" || slurmd -f "$CONF" -N "$name" \
      || die "slurmd $name did not start (see $DIR/log/slurmd-$name.log)"
  done < <(node_names)
  wait_idle
  log "up: $NODES nodes ($(sinfo -h -o '%N')) in $((SECONDS - started)) s; logs in $DIR/log"
  echo "export SLURM_CONF=$CONF"
}

stop_pidfiles() {
  # Signal all first, then wait: each daemon takes about 2 s to exit.
  local pidfile pids=() pid i
  for pidfile in "$@"; do alive "$pidfile" && pids+=("$(cat "$pidfile")"); done
  ((${#pids[@]})) || return 0
  kill "${pids[@]}" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && break; done
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -9 "${pids[@]}" 2>/dev/null || true
}

cmd_down() {
  export SLURM_CONF="$CONF"
  local name i
  if alive "$DIR/run/slurmctld.pid"; then
    # Cancel our jobs first so that no job step outlives its slurmd.
    scancel --partition=debug 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
      [[ -z "$(squeue -h -o %i 2>/dev/null)" ]] && break
      sleep 0.1
    done
  fi
  local pidfiles=("$DIR/run/slurmctld.pid")
  while read -r name; do pidfiles+=("$DIR/run/slurmd-$name.pid"); done < <(node_names)
  stop_pidfiles "${pidfiles[@]}"
  stop_pidfiles "$DIR/munge/private/munged.pid"
  [[ "$(id -u)" == 0 ]] && remove_hosts
  rm -rf "$DIR"
  log "down"
}

cmd_status() {
  export SLURM_CONF="$CONF"
  alive "$DIR/run/slurmctld.pid" || { log "not running ($DIR)"; return 1; }
  sinfo -N >&2
  squeue >&2
  echo "export SLURM_CONF=$CONF"
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
