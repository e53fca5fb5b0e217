# shellcheck shell=bash
# What the local Slurms share (sourced by scripts/slurm_local.sh and scripts/cluster_local.sh):
# messages, pid files, munge, the common part of slurm.conf, and waiting for nodes.
#
# The sourcing script sets PROG (its name in messages) and DIR (its state directory) first.

say() { printf '%s: %s\n' "$PROG" "$*"; }

die() {  # die <what went wrong> [log to read ...]
  local msg=$1 log
  shift
  printf '%s: ERROR: %s\n' "$PROG" "$msg" >&2
  for log in "$@"; do
    printf '%s: read %s; its last lines:\n' "$PROG" "$log" >&2
    tail -n 15 "$log" 2>/dev/null | sed 's/^/    /' >&2 || printf '    (%s is missing)\n' "$log" >&2
    if tail -n 15 "$log" 2>/dev/null | grep -q 'Address already in use'; then
      printf '%s: another slurmctld/slurmd holds the port: stop it first (another state directory, or the system Slurm)\n' \
        "$PROG" >&2
    fi
  done
  exit 1
}

wait_until() {  # wait_until <tenths of a second> <command...>: 0 as soon as the command succeeds
  local tenths=$1
  shift
  while [ "$tenths" -gt 0 ]; do
    "$@" && return 0
    sleep 0.1
    tenths=$((tenths - 1))
  done
  "$@"
}

alive() {  # alive <pidfile>: the pid in it is a running process
  local pid
  [ -r "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null || true)
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

gone() { ! kill -0 "$1" 2>/dev/null; }

all_gone() {  # all_gone <pid>...: none of them is running
  local pid
  for pid in "$@"; do kill -0 "$pid" 2>/dev/null && return 1; done
  return 0
}

stop_pidfile() {  # stop_pidfile <pidfile> <name>: TERM, then KILL after 10 s; removes the file
  local pidfile=$1 name=$2 pid
  if ! alive "$pidfile"; then rm -f "$pidfile"; return 0; fi
  pid=$(cat "$pidfile")
  say "stopping $name (pid $pid)"
  kill "$pid" 2>/dev/null || true
  if wait_until 100 gone "$pid"; then :; else kill -9 "$pid" 2>/dev/null || true; fi
  rm -f "$pidfile"
}

stop_pidfiles() {  # stop_pidfiles <pidfile>...: TERM to all at once, then KILL after 10 s; removes the files
  local pidfile pid pids=() left
  for pidfile in "$@"; do
    if alive "$pidfile"; then
      pid=$(cat "$pidfile")
      say "stopping $(basename "$pidfile" .pid) (pid $pid)"
      kill "$pid" 2>/dev/null || true
      pids+=("$pid")
    fi
    rm -f "$pidfile"
  done
  [ ${#pids[@]} -gt 0 ] || return 0
  if ! wait_until 100 all_gone "${pids[@]}"; then
    for left in "${pids[@]}"; do kill -9 "$left" 2>/dev/null || true; done
  fi
}

need_root() {  # need_root <what needs it>
  [ "$(id -u)" = 0 ] || die "$1 needs root (try: sudo $0 ${COMMAND:-start})"
}

munge_ok() { command -v munge >/dev/null && munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {  # starts munged unless one answers; the pid it started goes to $DIR/munged.started
  if munge_ok; then return 0; fi
  command -v munged >/dev/null || [ -x /usr/sbin/munged ] || die "munged not found: apt-get install munge"
  need_root "starting munged"
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
  if wait_until 50 munge_ok; then
    cp /run/munge/munged.pid "$DIR/munged.started" 2>/dev/null || true
    return 0
  fi
  die "munged started but munge -n | unmunge fails" /var/log/munge/munged.log
}

real_memory_mib() {  # real_memory_mib <fraction of MemTotal>: slurmd drains a node that has less than it says
  awk -v f="$1" '/^MemTotal:/ {printf "%d", $2 / 1024 * f}' /proc/meminfo
}

slurm_conf_common() {  # the slurm.conf lines both local Slurms share (daemons as root, no accounting)
  cat <<EOF
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmctldLogFile=$DIR/slurmctld.log
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
EOF
}

install_conf() {  # install_conf <new file> <conf>: 0 when it changed (moved into place), 1 when not
  if [ -f "$2" ] && cmp -s "$1" "$2"; then
    rm -f "$1"
    return 1
  fi
  mv "$1" "$2"
  return 0
}

node_states() {  # node_states <node>...: "name state" per node, as sinfo sees them
  local nodes
  nodes=$(IFS=,; printf '%s' "$*")
  sinfo -h -N -n "$nodes" -o '%N %T' 2>/dev/null | sort -u || true
}

wait_nodes_idle() {  # wait_nodes_idle <timeout s> <logs to show on failure: "a b"> <node>...
  local timeout=$1 logs=$2 deadline state node ready resumed=""
  shift 2
  deadline=$((SECONDS + timeout))
  while :; do
    ready=0
    while read -r node state; do
      [ -n "$node" ] || continue
      case "$state" in
        idle|mixed|allocated|completing) ready=$((ready + 1)) ;;   # "idle*" (not responding) keeps waiting
        down*|drain*|fail*|inval*)
          case " $resumed " in *" $node "*) ;; *)
            say "node $node is '$state', resuming it"
            scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true
            resumed="$resumed $node" ;;
          esac ;;
      esac
    done < <(node_states "$@")
    [ "$ready" -lt $# ] || return 0
    if [ $SECONDS -ge $deadline ]; then
      local report
      report=$(sinfo -h -N -n "$(IFS=,; printf '%s' "$*")" -o '%N %T reason=%E' 2>/dev/null || true)
      # shellcheck disable=SC2086
      die "nodes not idle after ${timeout}s: ${report:-sinfo gave nothing} ('*' means slurmctld gets no answer from slurmd)" $logs
    fi
    sleep 0.5
  done
}
