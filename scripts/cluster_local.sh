#!/usr/bin/env bash
# An emulated Slurm cluster of two nodes on this one machine, for the test suite and for trying the
# slurm/*.sbatch templates the way they run on a real cluster.
#
#   scripts/cluster_local.sh up                  # build and start it (idempotent; restarts what died)
#   scripts/cluster_local.sh status              # daemons, nodes, links; exit 1 when not up
#   scripts/cluster_local.sh env                 # `export SLURM_CONF=...`:  eval "$(scripts/cluster_local.sh env)"
#   scripts/cluster_local.sh exec NODE CMD...    # run CMD on a node (its network, host name and mounts)
#   scripts/cluster_local.sh down                # stop everything it started, by pid, and remove it all
#
# Each node is a network namespace on a bridge (its own address, its link `eth0`), with its own host
# name (a UTS namespace) and mounts (a mount namespace), held by one process per node. Every node
# runs its own slurmd (started with its node name) and a real sshd (a host key of its own; a key
# pair generated for root, known to every node), so horovodrun and mpirun reach the other node by
# ssh as on a cluster, and ranks on different nodes see different host names and addresses. One
# slurmctld, in this machine's own namespace, and munge serve both. The node names resolve through
# lines added to /etc/hosts, and `ssh NODE` works through /etc/ssh/ssh_config.d/ssd-allreduce-cluster.conf;
# both are removed by `down`. Everything else lives under $SSD_CLUSTER_DIR and is removed by `down`
# too. It runs beside scripts/slurm_local.sh (its slurmctld has a port of its own).
#
# Needs root (namespaces, daemons as root) and the Debian packages slurm-wlm, munge and
# openssh-server; `up` installs what is missing with apt-get (SSD_SKIP_APT=1: it does not).
#
# Knobs:
#   SSD_CLUSTER_DIR=dir        config, state, keys and logs (default /tmp/ssd-allreduce-cluster)
#   SSD_CLUSTER_NODES=N        how many nodes (default 2)
#   SSD_CLUSTER_NODE_PREFIX=p  node names p1, p2, ... (default ssd-node)
#   SSD_CLUSTER_SUBNET=a.b.c   the bridge is a.b.c.1, node i is a.b.c.(10+i) (default 10.77.0)
#   SSD_CLUSTER_PORT=P         slurmctld's port (default 6827; the one-node Slurm uses 6817)
#   SSD_CLUSTER_CPUS=N         CPUs each node advertises (default max(nproc, 4): oversubscribed)
#   SSD_CLUSTER_RATE=r         shape every node's link both ways with tc tbf, e.g. 1gbit (default: unshaped)
#   SSD_CLUSTER_DELAY=t        add this delay on each link where tc netem exists, e.g. 1ms
#   SSD_CLUSTER_TIMEOUT=S      seconds to wait for the nodes to become idle (default 60)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${SSD_CLUSTER_DIR:-/tmp/ssd-allreduce-cluster}
CONF=$DIR/slurm.conf
NODE_COUNT=${SSD_CLUSTER_NODES:-2}
NODE_PREFIX=${SSD_CLUSTER_NODE_PREFIX:-ssd-node}
SUBNET=${SSD_CLUSTER_SUBNET:-10.77.0}
CTLD_PORT=${SSD_CLUSTER_PORT:-6827}
RATE=${SSD_CLUSTER_RATE:-}
DELAY=${SSD_CLUSTER_DELAY:-}
TIMEOUT=${SSD_CLUSTER_TIMEOUT:-60}
PY=${SSD_VENV:-$REPO/.venv}/bin/python
BRIDGE=ssdc-br0
IFACE=eth0                                   # each node's link, named alike on every node
MARK="# ssd-allreduce cluster_local.sh"      # ends every line it adds to /etc/hosts
SSH_CLIENT_CONF=/etc/ssh/ssh_config.d/ssd-allreduce-cluster.conf
PROG=cluster_local
COMMAND=${1:-}
export SLURM_CONF=$CONF
PATH=$PATH:/usr/sbin:/sbin
# shellcheck source=scripts/lib/slurm_common.sh
source "$REPO/scripts/lib/slurm_common.sh"

case "$NODE_COUNT" in ''|*[!0-9]*) die "SSD_CLUSTER_NODES must be a number of nodes (1-9), got '$NODE_COUNT'" ;; esac
if [ "$NODE_COUNT" -lt 1 ] || [ "$NODE_COUNT" -gt 9 ]; then die "SSD_CLUSTER_NODES must be 1 to 9, got $NODE_COUNT"; fi
[[ $SUBNET =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "SSD_CLUSTER_SUBNET must be the first three numbers of an address (10.77.0), got '$SUBNET'"

nodes() { local i; for i in $(seq 1 "$NODE_COUNT"); do printf '%s%s\n' "$NODE_PREFIX" "$i"; done; }
node_index() { printf '%s' "${1#"$NODE_PREFIX"}"; }
node_addr() { printf '%s.%s' "$SUBNET" "$((10 + $(node_index "$1")))"; }
outer_link() { printf 'ssdc-v%s' "$(node_index "$1")"; }   # the bridge's end of a node's link
holder_pidfile() { printf '%s/%s.holder.pid' "$DIR" "$1"; }
is_node() { nodes | grep -qx -- "$1"; }

on_node() {  # on_node <node> <command...>: run it inside the node's namespaces
  local node=$1
  shift
  alive "$(holder_pidfile "$node")" || die "node $node is not up (scripts/cluster_local.sh up)"
  nsenter --target "$(cat "$(holder_pidfile "$node")")" --net --uts --mount -- "$@"
}

# ------------------------------------------------------------------------------ what it needs
ensure_tools() {  # installs the Debian packages of whatever is missing (as scripts/setup.sh does)
  local tool missing=() packages=()
  for tool in slurmctld:slurm-wlm slurmd:slurm-wlm sinfo:slurm-wlm munged:munge sshd:openssh-server \
              ssh:openssh-client ssh-keygen:openssh-client ip:iproute2 tc:iproute2 nsenter:util-linux \
              unshare:util-linux; do
    command -v "${tool%%:*}" >/dev/null && continue
    missing+=("${tool%%:*}")
    case " ${packages[*]} " in *" ${tool#*:} "*) ;; *) packages+=("${tool#*:}") ;; esac
  done
  [ ${#missing[@]} -gt 0 ] || return 0
  [ "${SSD_SKIP_APT:-0}" != 1 ] || die "missing ${missing[*]} and SSD_SKIP_APT=1: install ${packages[*]}"
  command -v apt-get >/dev/null || die "missing ${missing[*]}, and this is no Debian/Ubuntu (no apt-get): install ${packages[*]}"
  say "missing ${missing[*]}: apt-get install ${packages[*]}"
  apt-get update -qq || die "apt-get update failed: install ${packages[*]} by hand"
  # policy-rc.d or not, the packages' own services are not wanted: every daemon here starts per node
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null \
    || die "apt-get install ${packages[*]} failed: install them by hand"
  for tool in "${missing[@]}"; do
    command -v "$tool" >/dev/null || die "$tool is still missing after apt-get install ${packages[*]}"
  done
}

# ------------------------------------------------------------------------------ the network
make_network() {
  local node ns addr
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    say "bridge $BRIDGE at $SUBNET.1"
    ip link add "$BRIDGE" type bridge
    ip addr add "$SUBNET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
  fi
  for node in $(nodes); do
    ns=$node
    addr=$(node_addr "$node")
    if [ -e "/run/netns/$ns" ]; then   # a node whose link was cut (a node lost, in tests) comes back
      ip link set "$(outer_link "$node")" up 2>/dev/null || true
      continue
    fi
    say "node $node: network namespace, $IFACE at $addr"
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip link add "$(outer_link "$node")" type veth peer name "$IFACE" netns "$ns"
    ip link set "$(outer_link "$node")" master "$BRIDGE" up
    ip -n "$ns" addr add "$addr/24" dev "$IFACE"
    ip -n "$ns" link set "$IFACE" up
    if [ -n "$RATE" ]; then   # both ways: the node's end and the bridge's end of its link
      shape "$ns" "$IFACE"
      shape "" "$(outer_link "$node")"
    fi
  done
}

shape() {  # shape <netns or ""> <device>: the emulated nodes' shaping (ssd_allreduce.bench.nodes)
  [ -x "$PY" ] || die "shaping the links uses $PY: run scripts/setup.sh first, or leave SSD_CLUSTER_RATE unset"
  "$PY" -c 'import sys; from ssd_allreduce.bench.nodes import shape_link; shape_link(*sys.argv[1:])' \
    "$2" "$RATE" "$DELAY" "$1" || die "could not shape $2 to '$RATE' (SSD_CLUSTER_RATE: e.g. 100mbit, 1gbit)"
}

write_hosts() {
  local node tmp
  tmp=$(mktemp)
  grep -v -- "$MARK\$" /etc/hosts >"$tmp" || true
  for node in $(nodes); do printf '%s %s %s\n' "$(node_addr "$node")" "$node" "$MARK" >>"$tmp"; done
  cmp -s "$tmp" /etc/hosts || cat "$tmp" >/etc/hosts   # rewritten in place: /etc/hosts may be a mount
  rm -f "$tmp"
}

remove_hosts() {
  local tmp
  grep -q -- "$MARK\$" /etc/hosts 2>/dev/null || return 0
  tmp=$(mktemp)
  grep -v -- "$MARK\$" /etc/hosts >"$tmp" || true
  cat "$tmp" >/etc/hosts
  rm -f "$tmp"
}

# ------------------------------------------------------------------------------ ssh
make_ssh() {
  local node keys=$DIR/ssh
  mkdir -p "$keys"
  chmod 700 "$keys"
  [ -s "$keys/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C "root@$PROG" -f "$keys/id_ed25519"
  cp "$keys/id_ed25519.pub" "$keys/authorized_keys"
  : >"$keys/known_hosts"
  for node in $(nodes); do
    [ -s "$keys/host_$node" ] || ssh-keygen -q -t ed25519 -N '' -C "$node" -f "$keys/host_$node"
    printf '%s,%s %s\n' "$node" "$(node_addr "$node")" "$(cut -d' ' -f1,2 "$keys/host_$node.pub")" >>"$keys/known_hosts"
  done
  cat >"$DIR/sshd_config" <<EOF
# Written by scripts/cluster_local.sh: every node's sshd (its host key and pid file on the command line).
Port 22
AuthorizedKeysFile $keys/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
X11Forwarding no
EOF
  mkdir -p "$(dirname "$SSH_CLIENT_CONF")"
  cat >"$SSH_CLIENT_CONF" <<EOF
# Written by scripts/cluster_local.sh up, removed by down: root reaches the emulated nodes by ssh.
Host $(nodes | tr '\n' ' ')$(for node in $(nodes); do printf '%s ' "$(node_addr "$node")"; done)
    IdentityFile $keys/id_ed25519
    UserKnownHostsFile $keys/known_hosts
    StrictHostKeyChecking yes
    BatchMode yes
    LogLevel ERROR
EOF
  if [ ! -d /run/sshd ]; then   # sshd's privilege separation directory
    mkdir -p /run/sshd
    chmod 755 /run/sshd
    touch "$DIR/run-sshd.created"
  fi
}

# ------------------------------------------------------------------------------ slurm
write_conf() {  # 0 when slurm.conf changed
  local node tmp cpus
  cpus=${SSD_CLUSTER_CPUS:-$(nproc)}
  [ -n "${SSD_CLUSTER_CPUS:-}" ] || [ "$cpus" -ge 4 ] || cpus=4
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/pmix"
  tmp=$(mktemp "$DIR/slurm.conf.XXXXXX")
  {
    echo "# Written by scripts/cluster_local.sh: an emulated cluster for tests. Do not edit (it is rewritten)."
    echo "ClusterName=ssdcluster"
    echo "SlurmctldHost=$(hostname -s)($SUBNET.1)"
    echo "SlurmctldPort=$CTLD_PORT"
    slurm_conf_common
    echo "SlurmdSpoolDir=$DIR/spool/%n"
    echo "SlurmdPidFile=$DIR/slurmd.%n.pid"
    echo "SlurmdLogFile=$DIR/slurmd.%n.log"
    echo "SlurmdTimeout=30"
    echo "KillWait=5"
    for node in $(nodes); do
      echo "NodeName=$node NodeAddr=$(node_addr "$node") NodeHostname=$node CPUs=$cpus RealMemory=$(real_memory_mib "$(awk -v n="$NODE_COUNT" 'BEGIN {print 0.8 / n}')") State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=$(nodes | paste -sd,) Default=YES MaxTime=INFINITE OverSubscribe=FORCE:4 State=UP"
  } >"$tmp"
  : >"$DIR/plugstack.conf"
  # The nodes share /tmp: each its own PMIx directory (a bind mount in the node's mount namespace)
  echo "PMIxCliTmpDirBase=$DIR/pmix" >"$DIR/mpi.conf"
  install_conf "$tmp" "$CONF"
}

start_node() {  # start_node <node>: its holder (namespaces), sshd and slurmd, whichever is not running
  local node=$1 holder
  holder=$(holder_pidfile "$node")
  if ! alive "$holder"; then
    mkdir -p "$DIR/pmix-$node"
    # the process that holds the node's UTS and mount namespaces; everything on the node enters them
    nsenter --net="/run/netns/$node" unshare --uts --mount --propagation private -- \
      sh -c "hostname '$node' && mount --bind '$DIR/pmix-$node' '$DIR/pmix' && exec sleep infinity" \
      </dev/null >>"$DIR/$node.holder.log" 2>&1 &
    echo $! >"$holder"
    wait_until 50 on_node_ready "$node" || die "node $node's namespaces did not come up" "$DIR/$node.holder.log"
  fi
  if ! alive "$DIR/sshd.$node.pid"; then
    say "node $node: sshd"
    on_node "$node" /usr/sbin/sshd -f "$DIR/sshd_config" -h "$DIR/ssh/host_$node" \
      -o "PidFile=$DIR/sshd.$node.pid" -E "$DIR/sshd.$node.log" || die "sshd on $node failed to start" "$DIR/sshd.$node.log"
    wait_until 50 alive "$DIR/sshd.$node.pid" || die "sshd on $node exited right after starting" "$DIR/sshd.$node.log"
  fi
  if ! alive "$DIR/slurmd.$node.pid"; then
    say "node $node: slurmd"
    on_node "$node" slurmd -N "$node" -f "$CONF" || die "slurmd on $node failed to start" "$DIR/slurmd.$node.log"
    wait_until 50 alive "$DIR/slurmd.$node.pid" || die "slurmd on $node exited right after starting" "$DIR/slurmd.$node.log"
  fi
}

on_node_ready() { [ "$(on_node "$1" hostname 2>/dev/null)" = "$1" ]; }

up() {
  need_root "the emulated cluster (network namespaces, daemons as root)"
  ensure_tools
  mkdir -p "$DIR"
  start_munge
  make_network
  write_hosts
  make_ssh
  local changed=0 node
  if write_conf; then changed=1; fi
  if [ $changed = 1 ] && alive "$DIR/slurmctld.pid"; then
    say "slurm.conf changed, scontrol reconfigure"
    scontrol reconfigure || die "scontrol reconfigure failed" "$DIR/slurmctld.log"
  fi
  if ! alive "$DIR/slurmctld.pid"; then
    say "slurmctld at $SUBNET.1:$CTLD_PORT"
    slurmctld -f "$CONF" || die "slurmctld failed to start" "$DIR/slurmctld.log"
    wait_until 50 alive "$DIR/slurmctld.pid" || die "slurmctld exited right after starting" "$DIR/slurmctld.log"
  fi
  for node in $(nodes); do start_node "$node"; done
  local logs="$DIR/slurmctld.log"
  for node in $(nodes); do logs="$logs $DIR/slurmd.$node.log"; done
  # shellcheck disable=SC2046
  wait_nodes_idle "$TIMEOUT" "$logs" $(nodes)
  say "up: $(nodes | paste -sd' ') (${RATE:-unshaped} links); run:  export SLURM_CONF=$CONF"
}

# ------------------------------------------------------------------------------ down
down() {
  need_root "stopping the emulated cluster"
  local node pid holder daemons=("$DIR/slurmctld.pid")
  for node in $(nodes); do daemons+=("$DIR/slurmd.$node.pid" "$DIR/sshd.$node.pid"); done
  stop_pidfiles "${daemons[@]}"   # all at once: slurmd takes seconds to stop
  local holders=()
  for node in $(nodes); do
    holder=$(cat "$(holder_pidfile "$node")" 2>/dev/null || true)
    if [ -e "/run/netns/$node" ]; then   # what jobs left running on the node
      for pid in $(ip netns pids "$node" 2>/dev/null); do
        [ "$pid" = "$holder" ] || kill -9 "$pid" 2>/dev/null || true
      done
    fi
    holders+=("$(holder_pidfile "$node")")
  done
  stop_pidfiles "${holders[@]}"
  for node in $(nodes); do
    # the link first: a deleted namespace takes its end of the link only once the kernel frees it
    if ip link show "$(outer_link "$node")" >/dev/null 2>&1; then ip link delete "$(outer_link "$node")"; fi
    if [ -e "/run/netns/$node" ]; then ip netns delete "$node"; fi
  done
  if ip link show "$BRIDGE" >/dev/null 2>&1; then ip link delete "$BRIDGE"; fi
  remove_hosts
  rm -f "$SSH_CLIENT_CONF"
  if [ -e "$DIR/run-sshd.created" ]; then rmdir /run/sshd 2>/dev/null || true; fi
  if [ -s "$DIR/munged.started" ] && ! "$REPO/scripts/slurm_local.sh" status >/dev/null 2>&1; then
    stop_pidfile "$DIR/munged.started" munged   # started by `up`, and no other local Slurm uses it
  fi
  rm -rf "$DIR"
  say "down: nothing left"
}

# ------------------------------------------------------------------------------ status
status() {
  local rc=0 node
  if alive "$DIR/slurmctld.pid"; then say "slurmctld running (pid $(cat "$DIR/slurmctld.pid"))"; else say "slurmctld not running"; rc=1; fi
  for node in $(nodes); do
    if alive "$(holder_pidfile "$node")"; then
      say "node $node ($(node_addr "$node")): slurmd $(alive "$DIR/slurmd.$node.pid" && cat "$DIR/slurmd.$node.pid" || echo 'not running'), sshd $(alive "$DIR/sshd.$node.pid" && cat "$DIR/sshd.$node.pid" || echo 'not running')"
      if ! alive "$DIR/slurmd.$node.pid" || ! alive "$DIR/sshd.$node.pid"; then rc=1; fi
    else
      say "node $node not up"
      rc=1
    fi
  done
  if munge_ok; then say "munge ok"; else say "munge not running"; rc=1; fi
  if [ $rc = 0 ]; then sinfo -N || rc=1; fi
  return $rc
}

case "$COMMAND" in
  up) up ;;
  down) down ;;
  status) status ;;
  env) printf 'export SLURM_CONF=%s\n' "$CONF" ;;
  exec)
    [ $# -ge 3 ] || die "usage: $0 exec NODE COMMAND..."
    is_node "$2" || die "no node '$2': the nodes are $(nodes | paste -sd' ')"
    node=$2
    shift 2
    on_node "$node" "$@" ;;
  *) printf 'usage: %s {up|down|status|env|exec NODE COMMAND...}\n' "$0" >&2; exit 2 ;;
esac
