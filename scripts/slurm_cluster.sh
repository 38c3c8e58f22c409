#!/usr/bin/env bash
# A Slurm cluster on this machine, for testing the sbatch scripts of examples/slurm/ for real: the host as one node,
# and on request more nodes made on this host as Linux network and UTS namespaces.
#
#   bash scripts/slurm_cluster.sh install         # Debian's slurmd slurmctld slurm-client munge (apt-get; root)
#   bash scripts/slurm_cluster.sh start           # write the config, start munged, slurmctld and slurmd; wait for it
#   bash scripts/slurm_cluster.sh start-nodes 2   # also nodes nsr-node1..2, partition "nodes" (see below)
#   bash scripts/slurm_cluster.sh kill-node nsr-node2   # SIGKILL every process of that node (a node failure)
#   bash scripts/slurm_cluster.sh stop-nodes      # remove the namespace nodes again (their jobs end)
#   bash scripts/slurm_cluster.sh status          # sinfo
#   bash scripts/slurm_cluster.sh stop            # stop the daemons (running jobs end)
#
# Needs root (the daemons run as root: SlurmUser=root). The config goes to /etc/slurm/slurm.conf, marked as this
# script's: a slurm.conf that is not its own is never overwritten. The host is node `hostname -s` in the default
# partition "debug", with its CPUs and memory; proctrack/linuxproc, no cgroups, select/cons_tres with CR_CPU. State,
# spool and logs live under $NSR_SLURM_DIR (default /var/tmp/nsr-slurm); the daemons' logs are there when something
# fails.
#
# Namespace nodes (start-nodes N): node nsr-nodeK is a network namespace of that name with its own hostname (a UTS
# namespace), an address $NSR_SLURM_NET.(10+K) on a veth pair joined to the bridge nsr-br0 (the host is
# $NSR_SLURM_NET.1, default net 10.77.0), and its own slurmd. The names go into /etc/hosts (a marked block), so
# every node resolves every other. The nodes share this host's CPUs, memory and file system (each is given all the
# CPUs and 1/N of the memory): the point is real Slurm, real torchrun rendezvous and real TCP between hosts, not
# capacity. Processes the jobs start live in their node's namespaces; `kill-node` kills all of them and the slurmd,
# as a node that loses power; `start-nodes` again brings a killed node back. `stop-nodes` removes the namespaces,
# the bridge and the hosts block.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# written by nsr-megatron scripts/slurm_cluster.sh"
DIR=${NSR_SLURM_DIR:-/var/tmp/nsr-slurm}
NET=${NSR_SLURM_NET:-10.77.0}
BRIDGE=nsr-br0
HOSTS_MARK="# nsr-megatron slurm_cluster namespace nodes"

die() { echo "slurm_cluster: $*" >&2; exit 1; }

need_root() {
  [ "$(id -u)" = 0 ] || die "needs root (the test cluster runs its daemons as root); run it with sudo or as root."
}

install() {
  need_root
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
      && command -v munged >/dev/null; then
    echo "slurm_cluster: $(slurmctld -V) and munge are installed"
    return
  fi
  command -v apt-get >/dev/null || die "apt-get not found: install Slurm (slurmd, slurmctld, the client tools) and munge with this system's package manager."
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || die "apt-get update failed: the Debian package registry is not reachable."
  apt-get install -y -qq slurmd slurmctld slurm-client munge >/dev/null \
    || die "apt-get install slurmd slurmctld slurm-client munge failed (see the output above)."
  echo "slurm_cluster: installed $(slurmctld -V)"
}

node_count() { cat "$DIR/nodes" 2>/dev/null || echo 0; }

# write_conf N: the config for the host and N namespace nodes; returns 0 when it changed the file, 1 when not
write_conf() {
  local n=$1 host cpus mem ctl hostaddr="" tmp k
  if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    die "$CONF exists and is not this script's: this machine has its own Slurm configuration; not touching it."
  fi
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))  # MB, leaving 1 GB to the system
  ctl=$host
  if [ "$n" -gt 0 ]; then
    ctl="$host($NET.1)"
    hostaddr=" NodeAddr=$NET.1"
  fi
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" /etc/slurm
  tmp=$(mktemp)
  {
    echo "$MARK"
    echo "ClusterName=nsr-test"
    echo "SlurmctldHost=$ctl"
    echo "AuthType=auth/munge"
    echo "CredType=cred/munge"
    echo "SlurmUser=root"
    echo "SlurmdUser=root"
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_CPU"
    echo "MpiDefault=none"
    echo "ReturnToService=2"
    echo "JobRequeue=1"
    echo "SlurmdTimeout=20"
    echo "StateSaveLocation=$DIR/state"
    echo "SlurmdSpoolDir=$DIR/spool/%n"
    echo "SlurmctldLogFile=$DIR/log/slurmctld.log"
    echo "SlurmdLogFile=$DIR/log/slurmd-%n.log"
    echo "SlurmctldPidFile=$DIR/slurmctld.pid"
    echo "SlurmdPidFile=$DIR/slurmd-%n.pid"
    echo "SchedulerType=sched/backfill"
    echo "KillWait=10"
    echo "NodeName=$host CPUs=$cpus RealMemory=$mem$hostaddr State=UNKNOWN"
    for k in $(seq 1 "$n"); do
      echo "NodeName=nsr-node$k NodeAddr=$NET.$((10 + k)) CPUs=$cpus RealMemory=$(( mem / n )) State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP"
    if [ "$n" -gt 0 ]; then echo "PartitionName=nodes Nodes=nsr-node[1-$n] MaxTime=INFINITE State=UP"; fi
  } > "$tmp"
  if [ -f "$CONF" ] && cmp -s "$tmp" "$CONF"; then
    rm -f "$tmp"
    return 1
  fi
  chmod 644 "$tmp"
  mv "$tmp" "$CONF"
  return 0
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  [ -f /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null;
                                    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
  if ! pgrep -x munged >/dev/null; then
    runuser -u munge -- /usr/sbin/munged || die "munged did not start (see /var/log/munge/munged.log)."
  fi
}

stop_daemons() {
  local p
  for p in slurmd slurmctld; do
    pkill -x "$p" 2>/dev/null || true
    for _ in $(seq 50); do pgrep -x "$p" >/dev/null || break; sleep 0.2; done
    pkill -9 -x "$p" 2>/dev/null || true
  done
}

# the bridge, one namespace and veth pair per node, and the hosts block (idempotent)
net_up() {
  local n=$1 k ns
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge || die "cannot make the bridge $BRIDGE (needs CAP_NET_ADMIN)."
    ip addr add "$NET.1/24" dev "$BRIDGE"
  fi
  ip link set "$BRIDGE" up
  for k in $(seq 1 "$n"); do
    ns=nsr-node$k
    if ! ip netns list | grep -qw "$ns"; then
      ip netns add "$ns" || die "cannot make the network namespace $ns (needs CAP_SYS_ADMIN)."
      ip link add "nsr-v$k" type veth peer name "nsr-p$k"
      ip link set "nsr-p$k" netns "$ns"
      ip link set "nsr-v$k" master "$BRIDGE"
      ip link set "nsr-v$k" up
      ip netns exec "$ns" ip link set lo up
      ip netns exec "$ns" ip link set "nsr-p$k" name eth0
      ip netns exec "$ns" ip addr add "$NET.$((10 + k))/24" dev eth0
      ip netns exec "$ns" ip link set eth0 up
      ip netns exec "$ns" ip route add default via "$NET.1"
    fi
  done
  hosts_block "$n"
}

# /etc/hosts with the namespace nodes' names (rewritten in place: it may be a bind mount)
hosts_block() {
  local n=$1 k tmp
  tmp=$(mktemp)
  grep -vF "$HOSTS_MARK" /etc/hosts > "$tmp" || true
  for k in $(seq 1 "$n"); do echo "$NET.$((10 + k)) nsr-node$k $HOSTS_MARK" >> "$tmp"; done
  cat "$tmp" > /etc/hosts
  rm -f "$tmp"
}

net_down() {
  local ns
  for ns in $(ip netns list | awk '{print $1}' | grep '^nsr-node' || true); do
    ip netns pids "$ns" | xargs -r kill -9 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
  if ip link show "$BRIDGE" >/dev/null 2>&1; then ip link del "$BRIDGE"; fi
  hosts_block 0
}

wait_nodes() {
  local node state
  for node in "$@"; do
    state=""
    for _ in $(seq 90); do
      state=$(sinfo -h -N -n "$node" -o %T 2>/dev/null | head -1 || true)
      case "$state" in
        idle*|mixed*|allocated*) echo "slurm_cluster: node $node is $state"; continue 2 ;;
        down*|drain*) scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true ;;
      esac
      sleep 1
    done
    die "node $node did not come up (state: ${state:-none}); logs in $DIR/log/."
  done
}

# the host node and `node_count` namespace nodes; starts only what is not running
up() {
  need_root
  command -v slurmctld >/dev/null || die "Slurm is not installed: run 'bash scripts/slurm_cluster.sh install' first."
  local n host k nodes=()
  n=$(node_count)
  host=$(hostname -s)
  mkdir -p "$DIR"
  if write_conf "$n"; then stop_daemons; fi  # a changed node list needs every daemon restarted
  start_munge
  if [ "$n" -gt 0 ]; then net_up "$n"; fi
  pgrep -x slurmctld >/dev/null || slurmctld -i || die "slurmctld did not start (see $DIR/log/slurmctld.log)."
  mkdir -p "$DIR/spool/$host"
  alive "$DIR/slurmd-$host.pid" || slurmd || die "slurmd did not start (see $DIR/log/slurmd-$host.log)."
  nodes+=("$host")
  for k in $(seq 1 "$n"); do
    mkdir -p "$DIR/spool/nsr-node$k"
    # nsenter, not `ip netns exec`: that one remounts /sys, and slurmd needs the host's /sys/fs/cgroup
    alive "$DIR/slurmd-nsr-node$k.pid" || nsenter --net="/run/netns/nsr-node$k" unshare --uts \
        sh -c "hostname nsr-node$k && exec slurmd" \
      || die "slurmd of nsr-node$k did not start (see $DIR/log/slurmd-nsr-node$k.log)."
    nodes+=("nsr-node$k")
  done
  wait_nodes "${nodes[@]}"
}

start_nodes() {
  local n=${1:-}
  [[ "$n" =~ ^[1-9][0-9]?$ ]] || die "start-nodes takes the number of namespace nodes (1-99), got '$n'."
  need_root
  mkdir -p "$DIR"
  echo "$n" > "$DIR/nodes.tmp"
  mv "$DIR/nodes.tmp" "$DIR/nodes"
  up
}

kill_node() {
  local ns=${1:-}
  need_root
  ip netns list | awk '{print $1}' | grep -qx "$ns" \
    || die "no namespace node '$ns' (nodes: $(ip netns list | awk '{print $1}' | grep '^nsr-node' | tr '\n' ' '))."
  ip netns pids "$ns" | xargs -r kill -9
  echo "slurm_cluster: killed every process of $ns"
}

stop_nodes() {
  need_root
  rm -f "$DIR/nodes"
  net_down
  up
}

stop() {
  need_root
  stop_daemons
  net_down
  echo "slurm_cluster: stopped"
}

case "${1:-}" in
  install) install ;;
  start) up ;;
  start-nodes) start_nodes "${2:-}" ;;
  kill-node) kill_node "${2:-}" ;;
  stop-nodes) stop_nodes ;;
  status) sinfo ;;
  stop) stop ;;
  *) die "usage: bash scripts/slurm_cluster.sh install|start|start-nodes N|kill-node NAME|stop-nodes|status|stop" ;;
esac
