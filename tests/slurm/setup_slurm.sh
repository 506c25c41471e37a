#!/usr/bin/env bash
# Start a one-node Slurm cluster on this machine for the Slurm tests.
#
# Installs Debian's slurm-wlm and munge, writes /etc/slurm/slurm.conf for a single
# node reached over 127.0.0.1, and starts munged, slurmctld and slurmd as root
# without systemd. The node declares two fake GPUs (gres.conf without device files)
# so that `sbatch --test-only` accepts the GPU template's --gpus-per-node.
# Safe to run again: when the node is already up and idle it returns at once.
# Needs root and a Debian-like system with apt-get.
#
# Usage: sudo tests/slurm/setup_slurm.sh        then: sinfo
set -euo pipefail

PARTITION=debug
NODE=$(hostname -s)
CONF_DIR=/etc/slurm

node_ready() {
    command -v sinfo >/dev/null 2>&1 || return 1
    local state
    # sinfo retries for a long time when no controller responds, so bound it.
    state=$(timeout 10 sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n 1) || return 1
    [[ "$state" == idle* || "$state" == mixed* || "$state" == allocated* ]]
}

if node_ready; then
    echo "slurm: node $NODE is up ($(sinfo -h -n "$NODE" -o %T | head -n 1))"
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    echo "error: setting up Slurm needs root; run: sudo $0" >&2
    exit 1
fi

if ! command -v slurmctld >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

# munge authenticates every Slurm message; its key must be owned by munge, mode 0400.
if [[ ! -s /etc/munge/munge.key ]]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! munge -n </dev/null >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged
fi

cpus=$(nproc)
# Leave 10% of memory out of the node's RealMemory, as slurmd reports slightly less.
memory_mb=$(awk '/MemTotal/ { printf "%d", $2 / 1024 * 0.9 }' /proc/meminfo)
mkdir -p "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
new_conf=$(mktemp -d)
cat >"$new_conf/slurm.conf" <<CONF
# One-node test cluster written by tests/slurm/setup_slurm.sh.
ClusterName=hpcdl-test
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
# No cgroups in containers: track processes by parent id and bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory_mb Gres=gpu:2 State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF
cat >"$new_conf/gres.conf" <<CONF
# Two fake GPUs so that jobs may request --gpus-per-node 2. slurmd counts a GPU only
# when it has a device file, so two harmless character devices stand in for them.
NodeName=$NODE Name=gpu File=/dev/null
NodeName=$NODE Name=gpu File=/dev/zero
CONF

# A changed configuration needs a restart of both daemons, which read it at start.
restart=0
for name in slurm.conf gres.conf; do
    if ! cmp -s "$new_conf/$name" "$CONF_DIR/$name"; then
        cp "$new_conf/$name" "$CONF_DIR/$name"
        restart=1
    fi
done
rm -rf "$new_conf"
if [[ $restart -eq 1 ]]; then
    for pidfile in /run/slurmd.pid /run/slurmctld.pid; do
        pid=$(cat "$pidfile" 2>/dev/null || true)
        if [[ -n $pid ]] && kill "$pid" 2>/dev/null; then
            # The daemon removes its pid file before it exits, so wait on the pid.
            while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
        fi
    done
fi

if ! pgrep -x slurmctld >/dev/null; then
    slurmctld
fi
if ! pgrep -x slurmd >/dev/null; then
    slurmd
fi

for _ in $(seq 1 60); do
    if node_ready; then
        echo "slurm: node $NODE is up ($(sinfo -h -n "$NODE" -o %T | head -n 1))"
        exit 0
    fi
    state=$(timeout 10 sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n 1 || true)
    if [[ "$state" == down* || "$state" == drain* ]]; then
        timeout 10 scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
    fi
    sleep 1
done
echo "error: Slurm node $NODE did not become idle within 60 s; see /var/log/slurm/" >&2
timeout 10 sinfo -N -l >&2 || true
exit 1
