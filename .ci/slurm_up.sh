#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for tests/test_slurm.py: installs Debian's slurm-wlm and
# munge if they are missing, writes slurm.conf and cgroup.conf (/etc/slurm), creates the munge key,
# starts munged, slurmctld and slurmd, and waits until sinfo shows the node idle. Running it again
# with the cluster up changes nothing. Needs root; exits non-zero (with one line why) where it cannot.
#
#   sudo .ci/slurm_up.sh            # then: sinfo; sbatch --gres=none -c 1 --mem=1G --wrap hostname
#
# The node is this host (hostname -s) with all its CPUs (nproc) and most of its memory; there is no
# GPU, no accounting database (scontrol show job keeps finished jobs for MinJobAge = 1 h) and no
# cgroup enforcement (containers rarely allow it). Its one partition is named "local" and is the
# default, so scripts never need to name it.
set -euo pipefail

CONF_DIR="${SLURM_CONF_DIR:-/etc/slurm}"
NODE="$(hostname -s)"
say() { echo "slurm_up: $*" >&2; }

[[ "$(id -u)" == 0 ]] || { say "must run as root (it installs packages and starts daemons)"; exit 1; }

node_idle() {
    [[ "$(sinfo -h -n "$NODE" -o '%t' 2>/dev/null | head -1)" =~ ^(idle|mix|alloc) ]]
}

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    say "installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq slurm-wlm munge >/dev/null
fi

# Munge: one key shared by every daemon and client (here all on one host).
if [[ ! -s /etc/munge/munge.key ]]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key 2>/dev/null || true
chmod 0400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
if ! pgrep -x munged >/dev/null; then
    if id munge >/dev/null 2>&1; then
        runuser -u munge -- munged
    else
        munged --force
    fi
fi

CPUS="$(nproc)"
MEM_MB="$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"
mkdir -p "$CONF_DIR" /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm
cat > "$CONF_DIR/slurm.conf.new" <<EOF
# Written by .ci/slurm_up.sh: a one-node test cluster on $NODE.
ClusterName=craftax-ci
SlurmctldHost=$NODE
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
MinJobAge=3600
EnforcePartLimits=ALL
SchedulerParameters=sched_interval=2
NodeName=$NODE CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=local Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
cat > "$CONF_DIR/cgroup.conf" <<'EOF'
# Written by .ci/slurm_up.sh; the cluster uses no cgroup plugin (proctrack/linuxproc, task/none).
CgroupAutomount=no
ConstrainCores=no
ConstrainRAMSpace=no
EOF
CHANGED=0
if ! cmp -s "$CONF_DIR/slurm.conf.new" "$CONF_DIR/slurm.conf"; then
    mv "$CONF_DIR/slurm.conf.new" "$CONF_DIR/slurm.conf"
    CHANGED=1
else
    rm "$CONF_DIR/slurm.conf.new"
fi

if [[ "$CHANGED" == 0 ]] && pgrep -x slurmctld >/dev/null && pgrep -x slurmd >/dev/null && node_idle; then
    say "cluster already up: $(sinfo -h -o '%P %D %t %N' | head -1)"
    exit 0
fi
if [[ "$CHANGED" == 1 ]]; then  # a new config: restart the daemons (running jobs live on in slurmstepd)
    for daemon in slurmd slurmctld; do
        if [[ -f "/run/$daemon.pid" ]] && kill "$(cat "/run/$daemon.pid")" 2>/dev/null; then
            for _ in $(seq 30); do pgrep -x "$daemon" >/dev/null || break; sleep 1; done
        fi
    done
fi
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd

for _ in $(seq 60); do
    if node_idle; then
        say "cluster up: $(sinfo -h -o '%P %D %t %N' | head -1)"
        exit 0
    fi
    # A node that was down (a previous run's daemons stopped) is put back in service.
    if [[ "$(sinfo -h -n "$NODE" -o '%t' 2>/dev/null | head -1)" =~ ^down ]]; then
        scontrol update nodename="$NODE" state=resume 2>/dev/null || true
    fi
    sleep 1
done
say "the node did not become idle within 60 s; see /var/log/slurm/slurmctld.log and slurmd.log"
sinfo -N -l >&2 || true
exit 1
