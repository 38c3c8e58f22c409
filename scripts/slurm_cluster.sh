#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for testing the sbatch scripts of examples/slurm/ for real.
#
#   bash scripts/slurm_cluster.sh install   # Debian's slurmd slurmctld slurm-client munge (apt-get; root)
#   bash scripts/slurm_cluster.sh start     # write the config, start munged, slurmctld and slurmd; wait for the node
#   bash scripts/slurm_cluster.sh status    # sinfo
#   bash scripts/slurm_cluster.sh stop      # stop the daemons (running jobs end)
#
# Needs root (the daemons run as root: SlurmUser=root). The config goes to /etc/slurm/slurm.conf, marked as this
# script's: a slurm.conf that is not its own is never overwritten. One node (this host, its CPUs and memory), one
# default partition "debug", proctrack/linuxproc, no cgroups, select/cons_tres with CR_CPU. State, spool and logs
# live under $NSR_SLURM_DIR (default /var/tmp/nsr-slurm); the daemons' logs are there when something fails.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# written by nsr-megatron scripts/slurm_cluster.sh"
DIR=${NSR_SLURM_DIR:-/var/tmp/nsr-slurm}

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

write_conf() {
  if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    die "$CONF exists and is not this script's: this machine has its own Slurm configuration; not touching it."
  fi
  local host cpus mem
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))  # MB, leaving 1 GB to the system
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" /etc/slurm
  cat > "$CONF" <<EOF
$MARK
ClusterName=nsr-test
SlurmctldHost=$host
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobRequeue=1
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SchedulerType=sched/backfill
KillWait=10
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
  need_root
  command -v slurmctld >/dev/null || die "Slurm is not installed: run 'bash scripts/slurm_cluster.sh install' first."
  write_conf
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  [ -f /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null;
                                    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
  if ! pgrep -x munged >/dev/null; then
    runuser -u munge -- /usr/sbin/munged || die "munged did not start (see /var/log/munge/munged.log)."
  fi
  pgrep -x slurmctld >/dev/null || slurmctld -i || die "slurmctld did not start (see $DIR/log/slurmctld.log)."
  pgrep -x slurmd >/dev/null || slurmd || die "slurmd did not start (see $DIR/log/slurmd.log)."
  local host
  host=$(hostname -s)
  for _ in $(seq 60); do
    state=$(sinfo -h -n "$host" -o %T 2>/dev/null || true)
    case "$state" in
      idle*|mixed*|allocated*) echo "slurm_cluster: node $host is $state"; return ;;
      down*|drain*) scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 1
  done
  die "node $host did not come up (state: ${state:-none}); logs in $DIR/log/."
}

stop() {
  need_root
  pkill -x slurmd 2>/dev/null || true
  pkill -x slurmctld 2>/dev/null || true
  echo "slurm_cluster: stopped"
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  status) sinfo ;;
  stop) stop ;;
  *) die "usage: bash scripts/slurm_cluster.sh install|start|status|stop" ;;
esac
