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
# run as root, SlurmUser=root) and the Debian packages slurm-wlm and munge. Two nodes, each with
# its own host name and address: scripts/cluster_local.sh.
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
PROG=slurm_local
COMMAND=${1:-}
export SLURM_CONF=$CONF
# shellcheck source=scripts/lib/slurm_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/slurm_common.sh"

host() { hostname -s; }

write_conf() {  # 0 when slurm.conf changed
  local h cpus tmp
  h=$(host)
  cpus=${SSD_SLURM_CPUS:-$(nproc)}
  [ -n "${SSD_SLURM_CPUS:-}" ] || [ "$cpus" -ge 4 ] || cpus=4
  mkdir -p "$DIR/state" "$DIR/spool"
  tmp=$(mktemp "$DIR/slurm.conf.XXXXXX")
  {
    echo "# Written by scripts/slurm_local.sh: a one-node Slurm for tests. Do not edit (it is rewritten)."
    echo "ClusterName=local"
    echo "SlurmctldHost=$h"
    slurm_conf_common
    echo "SlurmdSpoolDir=$DIR/spool"
    echo "SlurmdPidFile=$DIR/slurmd.pid"
    echo "SlurmdLogFile=$DIR/slurmd.log"
    echo "NodeName=$h CPUs=$cpus RealMemory=$(real_memory_mib 0.9) State=UNKNOWN"
    echo "PartitionName=debug Nodes=$h Default=YES MaxTime=INFINITE OverSubscribe=FORCE:4 State=UP"
  } >"$tmp"
  : >"$DIR/plugstack.conf"   # no SPANK plugins (the system /etc/slurm one is not read)
  install_conf "$tmp" "$CONF"
}

node_state() { sinfo -h -N -n "$(host)" -o '%T' 2>/dev/null | head -n 1 || true; }

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
    need_root "starting slurmctld (SlurmUser=root)"
    say "starting slurmctld"
    slurmctld -f "$CONF" || die "slurmctld failed to start" "$DIR/slurmctld.log"
  fi
  if ! alive "$DIR/slurmd.pid"; then
    say "starting slurmd"
    slurmd -f "$CONF" || die "slurmd failed to start" "$DIR/slurmd.log"
  fi
  wait_until 50 alive "$DIR/slurmctld.pid" || die "slurmctld exited right after starting" "$DIR/slurmctld.log"
  wait_until 50 alive "$DIR/slurmd.pid" || die "slurmd exited right after starting" "$DIR/slurmd.log"
  wait_nodes_idle "$TIMEOUT" "$DIR/slurmd.log $DIR/slurmctld.log" "$(host)"
  say "node $(host) is $(node_state); run:  export SLURM_CONF=$CONF"
}

stop() {
  stop_pidfile "$DIR/slurmd.pid" slurmd
  stop_pidfile "$DIR/slurmctld.pid" slurmctld
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

case "$COMMAND" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) printf 'export SLURM_CONF=%s\n' "$CONF" ;;
  *) printf 'usage: %s {start|stop|status|env}\n' "$0" >&2; exit 2 ;;
esac
