#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, for tests/slurm.rs: Debian's slurm-wlm
# (slurmctld, slurmd) with munge authentication, every file under DIR (default
# target/tmp/slurm), nothing under /etc touched. Installs slurm-wlm with apt-get if sbatch is
# missing (needs root, as the daemons do). Prints the SLURM_CONF to use and exits once the node
# is idle; a second call with the same DIR reuses the running daemons.
#
#   tests/slurm/start.sh [DIR]      start (or reuse) the cluster
#   tests/slurm/start.sh stop [DIR] stop its daemons
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
if [ "${1:-}" = stop ]; then
    dir=${2:-$root/target/tmp/slurm}
    for pid in "$dir"/slurmd.pid "$dir"/slurmctld.pid "$dir"/munged.pid; do
        [ -f "$pid" ] && kill "$(cat "$pid")" 2>/dev/null || true
    done
    exit 0
fi
dir=${1:-$root/target/tmp/slurm}
if [ "$(id -u)" != 0 ]; then
    echo "tests/slurm/start.sh needs root: it installs slurm-wlm and runs slurmctld, slurmd and munged as root" >&2
    exit 1
fi
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
conf=$dir/slurm.conf
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    echo "installing slurm-wlm (apt-get)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm >&2 \
        || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm >&2; }
fi

if ! alive "$dir/munged.pid"; then
    [ -f "$dir/munge.key" ] || { head -c 1024 /dev/urandom > "$dir/munge.key"; chmod 600 "$dir/munge.key"; }
    # As root munged needs --force; its socket and key stay in $dir.
    munged --force --key-file="$dir/munge.key" --socket="$dir/munge.socket" \
        --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munged.seed"
fi

node=$(hostname -s)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 ))
mkdir -p "$dir/state" "$dir/spool"
cat > "$conf" <<CONF
ClusterName=xkd-test
SlurmctldHost=$node
SlurmctldPort=${XKD_SLURMCTLD_PORT:-16817}
SlurmdPort=${XKD_SLURMD_PORT:-16818}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# Eight task slots whatever the cores (config_overrides): a job of a coordinator and its
# workers fits on a 2-core machine.
SlurmdParameters=config_overrides
NodeName=$node CPUs=8 RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=60 State=UP
CONF
export SLURM_CONF=$conf
alive "$dir/slurmctld.pid" || slurmctld -f "$conf"
alive "$dir/slurmd.pid" || slurmd -f "$conf"
for _ in $(seq 1 60); do
    state=$(sinfo -h -n "$node" -o %t 2>/dev/null || true)
    case $state in
        idle|mix|alloc) echo "$conf"; exit 0 ;;
    esac
    sleep 0.5
done
echo "the Slurm node did not come up (state '${state:-none}'); logs in $dir" >&2
tail -n 20 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 || true
exit 1
