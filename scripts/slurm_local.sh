#!/usr/bin/env bash
# A one-node Slurm on this machine, for the test suite and for trying the slurm/*.sbatch templates.
#
#   scripts/slurm_local.sh start     # munge + slurmctld + slurmd, waits until the node is idle (idempotent)
#   scripts/slurm_local.sh status    # daemons' pids and `sinfo`; exit 1 when not running
#   scripts/slurm_local.sh env       # prints `export SLURM_CONF=...`:  eval "$(scripts/slurm_local.sh env)"
#   scripts/slurm_local.sh stop      # kills slurmd and slurmctld by their pid files (munge is left running)
#
# Everything (slurm.conf, state, spool, pid files, logs) lives under $SSD_SLURM_DIR
# (default /tmp/ssd-allreduce-slurm); the system /etc/slurm is not used. Needs root (the daemons
# run as root, SlurmUser=root) and the Debian packages slurm-wlm and munge.
#
# Knobs:
#   SSD_SLURM_DIR=dir       where config, state and logs go
#   SSD_SLURM_CPUS=N        CPUs the node advertises (default: max(nproc, 4)); more than the machine
#                           has is allowed (SlurmdParameters=config_overrides) so that 2-task jobs
#                           plus their steps fit on a 2-core machine; the partition also oversubscribes.
#   SSD_SLURM_TIMEOUT=S     seconds to wait for the node to become idle (default 30)
set -euo pipefail

DIR=${SSD_SLURM_DIR:-/tmp/ssd-allreduce-slurm}
CONF=$DIR/slurm.conf
TIMEOUT=${SSD_SLURM_TIMEOUT:-30}
export SLURM_CONF=$CONF

die() {  # die <what went wrong> [log to read ...]
  local msg=$1 log
  shift
  printf 'slurm_local: ERROR: %s\n' "$msg" >&2
  for log in "$@"; do
    printf 'slurm_local: read %s; its last lines:\n' "$log" >&2
    tail -n 15 "$log" 2>/dev/null | sed 's/^/    /' >&2 || printf '    (%s is missing)\n' "$log" >&2
    if tail -n 15 "$log" 2>/dev/null | grep -q 'Address already in use'; then
      printf 'slurm_local: another slurmctld/slurmd holds the ports (6817/6818): stop it first (another SSD_SLURM_DIR, or the system Slurm)\n' >&2
    fi
  done
  exit 1
}
say() { printf 'slurm_local: %s\n' "$*"; }

host() { hostname -s; }

alive() {  # alive <pidfile>: the pid in it is a running process
  local pid
  [ -r "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null || true)
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

munge_ok() { command -v munge >/dev/null && munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  if munge_ok; then return 0; fi
  command -v munged >/dev/null || [ -x /usr/sbin/munged ] || die "munged not found: apt-get install munge"
  [ "$(id -u)" = 0 ] || die "munge is not running and starting it needs root (try: sudo $0 start)"
  if [ ! -s /etc/munge/munge.key ]; then
    say "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
  fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  say "starting munged"
  su -s /bin/sh munge -c /usr/sbin/munged || die "munged failed to start" /var/log/munge/munged.log
  local i
  for i in $(seq 1 50); do munge_ok && return 0; sleep 0.1; done
  die "munged started but munge -n | unmunge fails" /var/log/munge/munged.log
}

write_conf() {
  local h cpus mem tmp
  h=$(host)
  cpus=${SSD_SLURM_CPUS:-$(nproc)}
  [ -n "${SSD_SLURM_CPUS:-}" ] || [ "$cpus" -ge 4 ] || cpus=4
  # RealMemory a bit under MemTotal, or slurmd drains the node ("Low RealMemory").
  mem=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
  mkdir -p "$DIR/state" "$DIR/spool"
  tmp=$(mktemp "$DIR/slurm.conf.XXXXXX")
  cat >"$tmp" <<EOF
# Written by scripts/slurm_local.sh: a one-node Slurm for tests. Do not edit (it is rewritten).
ClusterName=local
SlurmctldHost=$h
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
PlugStackConfig=$DIR/plugstack.conf
NodeName=$h CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$h Default=YES MaxTime=INFINITE OverSubscribe=FORCE:4 State=UP
EOF
  : >"$DIR/plugstack.conf"   # no SPANK plugins (the system /etc/slurm one is not read)
  if [ -f "$CONF" ] && cmp -s "$tmp" "$CONF"; then
    rm -f "$tmp"
    return 1   # unchanged
  fi
  mv "$tmp" "$CONF"
  return 0     # changed
}

node_state() { sinfo -h -N -n "$(host)" -o '%T' 2>/dev/null | head -n 1 || true; }

wait_idle() {
  local deadline state resumed=0
  deadline=$((SECONDS + TIMEOUT))
  while :; do
    state=$(node_state)
    case "$state" in
      idle|mixed|allocated|completing) return 0 ;;   # "idle*" etc. (not responding) keep waiting
      down*|drain*|drained*|fail*|inval*)
        if [ $resumed = 0 ]; then
          say "node is '$state', resuming it"
          scontrol update nodename="$(host)" state=resume >/dev/null 2>&1 || true
          resumed=1
        fi ;;
    esac
    if [ $SECONDS -ge $deadline ]; then
      local reason
      reason=$(sinfo -h -N -n "$(host)" -o '%E' 2>/dev/null | head -n 1 || true)
      if ! alive "$DIR/slurmctld.pid"; then die "slurmctld is not running" "$DIR/slurmctld.log"; fi
      if ! alive "$DIR/slurmd.pid"; then die "slurmd is not running" "$DIR/slurmd.log"; fi
      local hint=""
      case "$state" in *'*') hint=" - '*' means slurmctld gets no answer from slurmd" ;; esac
      die "node $(host) not idle after ${TIMEOUT}s (state '${state:-unknown}'$hint, reason '${reason:-none}')" \
        "$DIR/slurmd.log" "$DIR/slurmctld.log"
    fi
    sleep 0.5
  done
}

start() {
  command -v slurmctld >/dev/null || [ -x /usr/sbin/slurmctld ] \
    || die "slurmctld not found: apt-get install slurm-wlm"
  PATH=$PATH:/usr/sbin
  mkdir -p "$DIR"
  start_munge
  local changed=0
  if write_conf; then changed=1; fi
  if [ $changed = 1 ] && alive "$DIR/slurmctld.pid"; then
    say "slurm.conf changed, scontrol reconfigure"
    scontrol reconfigure || die "scontrol reconfigure failed" "$DIR/slurmctld.log"
  fi
  if ! alive "$DIR/slurmctld.pid"; then
    [ "$(id -u)" = 0 ] || die "slurmctld must start as root here (SlurmUser=root)"
    say "starting slurmctld"
    slurmctld -f "$CONF" || die "slurmctld failed to start" "$DIR/slurmctld.log"
  fi
  if ! alive "$DIR/slurmd.pid"; then
    say "starting slurmd"
    slurmd -f "$CONF" || die "slurmd failed to start" "$DIR/slurmd.log"
  fi
  local i
  for i in $(seq 1 50); do alive "$DIR/slurmctld.pid" && break; sleep 0.1; done
  alive "$DIR/slurmctld.pid" || die "slurmctld exited right after starting" "$DIR/slurmctld.log"
  for i in $(seq 1 50); do alive "$DIR/slurmd.pid" && break; sleep 0.1; done
  alive "$DIR/slurmd.pid" || die "slurmd exited right after starting" "$DIR/slurmd.log"
  wait_idle
  say "node $(host) is $(node_state); run:  export SLURM_CONF=$CONF"
}

stop_one() {  # stop_one <name>
  local pidfile=$DIR/$1.pid pid i
  if ! alive "$pidfile"; then rm -f "$pidfile"; return 0; fi
  pid=$(cat "$pidfile")
  say "stopping $1 (pid $pid)"
  kill "$pid" 2>/dev/null || true
  for i in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
  rm -f "$pidfile"
}

stop() {
  stop_one slurmd
  stop_one slurmctld
}

status() {
  local rc=0 d
  for d in slurmctld slurmd; do
    if alive "$DIR/$d.pid"; then say "$d running (pid $(cat "$DIR/$d.pid"))"; else say "$d not running"; rc=1; fi
  done
  if munge_ok; then say "munge ok"; else say "munge not running"; rc=1; fi
  if [ $rc = 0 ]; then sinfo || rc=1; fi
  return $rc
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) printf 'export SLURM_CONF=%s\n' "$CONF" ;;
  *) printf 'usage: %s {start|stop|status|env}\n' "$0" >&2; exit 2 ;;
esac
