#!/usr/bin/env bash
# A real Slurm cluster on this one machine, for the tests and for trying the Slurm path
# on a laptop: munged + slurmctld + one slurmd per "node", all on localhost, with every
# file (key, sockets, config, state, logs, pid files) in one private directory.
#
#   slurm/local-cluster.sh up [--nodes N]   start (idempotent); last line: export SLURM_CONF=<path>
#   slurm/local-cluster.sh down             stop exactly the daemons started here (by pid file)
#   slurm/local-cluster.sh status           daemons, nodes and jobs
#
# `up` without --nodes keeps a running cluster as it is (1 node when none runs);
# `up --nodes N` restarts a cluster of another shape with N nodes.
# Installs nothing: the OS packages (slurm-wlm, munge) come from `make os-deps`.
#
# Environment: GRADACCUM_SLURM_DIR (state directory, default /tmp/gradaccum-slurm),
# GRADACCUM_SLURM_PORT (slurmctld port, default 17000; node i listens on PORT+i),
# GRADACCUM_SLURM_CPUS (CPUs per node, default max(nproc, 2)).
#
# Nodes are named n1..nN, each with NodeAddr=127.0.0.1 and its own slurmd port: the
# names do not resolve, which is deliberate (as on clusters where a node's name is not
# its address, jobs must take the master address from `scontrol show node`).
set -euo pipefail

DIR=${GRADACCUM_SLURM_DIR:-/tmp/gradaccum-slurm}
BASE_PORT=${GRADACCUM_SLURM_PORT:-17000}
CONF="$DIR/etc/slurm.conf"
MUNGE_SOCKET="$DIR/run/munge.socket"
READY_TIMEOUT_S=60

die() {
  echo "local-cluster: $*" >&2
  exit 1
}
log() { echo "local-cluster: $*" >&2; }

usage() {
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
}

need_tools() {
  local missing=()
  for t in munged munge slurmctld slurmd sinfo scontrol squeue scancel sbatch srun; do
    command -v "$t" >/dev/null 2>&1 || [ -x "/usr/sbin/$t" ] || missing+=("$t")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    die "Slurm/munge are not installed (missing: ${missing[*]}); install them with \`make os-deps\` (Debian: apt-get install slurm-wlm munge)"
  fi
}

# sbin is not always on PATH for non-root users.
PATH="$PATH:/usr/sbin:/sbin"

pid_alive() { # pidfile expected-comm
  local f=$1 comm=$2 pid
  [ -s "$f" ] || return 1
  pid=$(cat "$f" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  # The comm check guards against a recycled pid: never signal someone else's process.
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ] || return 1
  return 0
}

configured_nodes() {
  [ -f "$DIR/nodes" ] && cat "$DIR/nodes" || echo 0
}

all_daemons_alive() {
  local n i
  n=$(configured_nodes)
  [ "$n" -gt 0 ] || return 1
  pid_alive "$DIR/run/munged.pid" munged || return 1
  pid_alive "$DIR/run/slurmctld.pid" slurmctld || return 1
  for ((i = 1; i <= n; i++)); do
    pid_alive "$DIR/run/slurmd.n$i.pid" slurmd || return 1
  done
}

nodes_idle() { # every configured node reports idle: a fresh start is complete
  local n states
  n=$(configured_nodes)
  states=$(SLURM_CONF=$CONF sinfo -h -N -o '%N %t' 2>/dev/null) || return 1
  [ "$(echo "$states" | grep -c ' idle$')" -eq "$n" ]
}

controller_answers() {
  SLURM_CONF=$CONF scontrol ping 2>/dev/null | grep -q 'is UP'
}

write_config() { # nodes
  local n=$1 cpus mem_mib host i
  cpus=${GRADACCUM_SLURM_CPUS:-$(nproc)}
  [ "$cpus" -ge 2 ] || cpus=2
  # 90% of RAM, shared by the nodes (they are one machine).
  mem_mib=$(awk -v n="$n" '/MemTotal/ {printf "%d", $2 / 1024 * 0.9 / n}' /proc/meminfo)
  host=$(hostname -s)
  mkdir -p "$DIR/etc" "$DIR/run" "$DIR/logs" "$DIR/state"
  for ((i = 1; i <= n; i++)); do mkdir -p "$DIR/spool/n$i"; done
  {
    cat <<EOF
# Written by slurm/local-cluster.sh; rewritten on every fresh start.
ClusterName=gradaccum
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$BASE_PORT
SlurmUser=$(id -un)
AuthType=auth/munge
CryptoType=crypto/munge
# cred_expire=5: a requeued job restarts after ~6 s instead of 121 s.
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=5
MailProg=/bin/true
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.%n.pid
SlurmctldLogFile=$DIR/logs/slurmctld.log
SlurmdLogFile=$DIR/logs/slurmd.%n.log
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
# The nodes share one machine's CPUs: trust this file, not the hardware count.
SlurmdParameters=config_overrides
# Finished jobs stay visible to scontrol for 10 minutes (status of a finished job).
MinJobAge=600
EOF
    for ((i = 1; i <= n; i++)); do
      echo "NodeName=n$i NodeHostname=$host NodeAddr=127.0.0.1 Port=$((BASE_PORT + i)) CPUs=$cpus RealMemory=$mem_mib State=UNKNOWN"
    done
    echo "PartitionName=debug Default=YES Nodes=ALL State=UP MaxTime=INFINITE"
  } >"$CONF.tmp"
  mv "$CONF.tmp" "$CONF"
  echo "$n" >"$DIR/nodes.tmp"
  mv "$DIR/nodes.tmp" "$DIR/nodes"
}

start_munged() {
  if [ ! -s "$DIR/etc/munge.key" ]; then
    (umask 077 && head -c 1024 /dev/urandom >"$DIR/etc/munge.key.tmp")
    mv "$DIR/etc/munge.key.tmp" "$DIR/etc/munge.key"
  fi
  chmod 400 "$DIR/etc/munge.key"
  munged --force --key-file="$DIR/etc/munge.key" --socket="$MUNGE_SOCKET" \
    --pid-file="$DIR/run/munged.pid" --log-file="$DIR/logs/munged.log" --seed-file="$DIR/state/munge.seed" 9>&- ||
    die "munged failed to start; see $DIR/logs/munged.log"
  munge -S "$MUNGE_SOCKET" -n | unmunge -S "$MUNGE_SOCKET" >/dev/null ||
    die "munge credentials do not verify; see $DIR/logs/munged.log"
}

start() { # nodes
  local n=$1 i deadline
  write_config "$n"
  export SLURM_CONF=$CONF
  start_munged
  # The daemons must not inherit the lock (fd 9), or they would hold it forever.
  # -c: forget jobs and node states of an earlier run, so "all idle" means this run.
  slurmctld -c -f "$CONF" 9>&- || die "slurmctld failed to start; see $DIR/logs/slurmctld.log"
  for ((i = 1; i <= n; i++)); do
    slurmd -f "$CONF" -N "n$i" 9>&- || die "slurmd n$i failed to start; see $DIR/logs/slurmd.n$i.log"
  done
  deadline=$((SECONDS + READY_TIMEOUT_S))
  until nodes_idle; do
    if [ $SECONDS -ge $deadline ]; then
      SLURM_CONF=$CONF sinfo -N >&2 || true
      die "nodes not idle after ${READY_TIMEOUT_S}s; see $DIR/logs/"
    fi
    sleep 0.2
  done
  log "up: $n node(s) idle ($(SLURM_CONF=$CONF sinfo -h -o '%N'))"
}

stop() {
  local f pid i pids=()
  if pid_alive "$DIR/run/slurmctld.pid" slurmctld && [ -f "$CONF" ]; then
    # Jobs first, so that no job step outlives its slurmd.
    SLURM_CONF=$CONF scancel --quiet --full --state=RUNNING,PENDING,SUSPENDED,REQUEUED $(SLURM_CONF=$CONF squeue -h -o %i 2>/dev/null) 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
      [ -z "$(SLURM_CONF=$CONF squeue -h -t R,CG -o %i 2>/dev/null)" ] && break
      sleep 0.2
    done
  fi
  for f in "$DIR"/run/slurmd.*.pid "$DIR/run/slurmctld.pid" "$DIR/run/munged.pid"; do
    [ -e "$f" ] || continue
    case $f in
    */slurmd.*) comm=slurmd ;;
    */slurmctld.pid) comm=slurmctld ;;
    *) comm=munged ;;
    esac
    if pid_alive "$f" "$comm"; then
      pid=$(cat "$f")
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid:$comm")
    fi
    rm -f "$f"
  done
  for entry in "${pids[@]}"; do
    pid=${entry%%:*}
    comm=${entry#*:}
    for ((i = 0; i < 100; i++)); do
      [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ] || break
      sleep 0.1
    done
    if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ]; then
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  rm -f "$DIR/nodes"
}

cmd_up() {
  local want=""
  while [ $# -gt 0 ]; do
    case $1 in
    --nodes)
      [ $# -ge 2 ] || die "--nodes needs a number"
      want=$2
      shift 2
      ;;
    --nodes=*)
      want=${1#--nodes=}
      shift
      ;;
    *) die "unknown argument to up: $1 (usage: up [--nodes N])" ;;
    esac
  done
  if [ -n "$want" ] && ! [[ $want =~ ^[1-9][0-9]*$ && $want -le 64 ]]; then
    die "--nodes must be an integer from 1 to 64, got '$want'"
  fi
  need_tools
  local have
  have=$(configured_nodes)
  # A running cluster is left alone whatever its jobs do (busy or completing nodes are fine):
  # other test sessions and users may be in the middle of a job.
  if all_daemons_alive && controller_answers; then
    if [ -z "$want" ] || [ "$want" -eq "$have" ]; then
      log "already up: $have node(s)"
      echo "export SLURM_CONF=$CONF"
      return 0
    fi
    log "running with $have node(s); restarting with $want"
  elif [ "$have" -gt 0 ]; then
    log "not healthy (a daemon is gone or slurmctld does not answer); restarting"
  fi
  [ -n "$want" ] || [ "$have" -eq 0 ] || want=$have
  stop
  start "${want:-1}"
  echo "export SLURM_CONF=$CONF"
}


cmd_status() {
  local n i st rc=0
  n=$(configured_nodes)
  if [ "$n" -eq 0 ]; then
    echo "local-cluster: down (state directory $DIR)"
    return 3
  fi
  for d in munged slurmctld; do
    if pid_alive "$DIR/run/$d.pid" "$d"; then st="running (pid $(cat "$DIR/run/$d.pid"))"; else st="NOT running"; rc=3; fi
    echo "$d: $st"
  done
  for ((i = 1; i <= n; i++)); do
    if pid_alive "$DIR/run/slurmd.n$i.pid" slurmd; then st="running (pid $(cat "$DIR/run/slurmd.n$i.pid"))"; else st="NOT running"; rc=3; fi
    echo "slurmd n$i: $st"
  done
  if [ $rc -eq 0 ]; then
    SLURM_CONF=$CONF sinfo -N || rc=3
    SLURM_CONF=$CONF squeue || rc=3
  fi
  echo "export SLURM_CONF=$CONF"
  return $rc
}

main() {
  [ $# -ge 1 ] || usage
  local cmd=$1
  shift
  case $cmd in
  up | down | status) ;;
  -h | --help) usage ;;
  *) die "unknown command '$cmd' (usage: up [--nodes N] | down | status)" ;;
  esac
  mkdir -p "$DIR"
  # One caller at a time: test sessions and users may call this concurrently.
  exec 9>"$DIR/.lock"
  flock -w 120 9 || die "another local-cluster.sh holds $DIR/.lock"
  case $cmd in
  up) cmd_up "$@" ;;
  down)
    [ $# -eq 0 ] || die "down takes no arguments"
    stop
    log "down"
    ;;
  status) cmd_status ;;
  esac
}

main "$@"
