#!/usr/bin/env bash
# A single-node SLURM cluster on this machine (Debian/Ubuntu, as root), to try the comparison
# runner's --launcher slurm and to test it: munge, slurmctld and slurmd with one node (this
# machine's CPUs and memory) in one partition, "debug". Idempotent: a cluster that already
# answers is left alone. Install the packages first:
#     apt-get install -y slurmctld slurmd slurm-client munge
# Every CPU may run SLURM_OVERSUBSCRIBE jobs at once (default 2): tests and tries submit jobs
# of one CPU each on a small machine whose cores other work shares too.
set -euo pipefail
if scontrol ping 2>/dev/null | grep -q UP && sinfo -h -o %T 2>/dev/null | grep -qE "idle|mix|alloc"; then
    echo "SLURM already up: $(sinfo -h -o '%P %D %T %c')"
    exit 0
fi
for tool in munged slurmctld slurmd sbatch; do
    command -v "$tool" >/dev/null || { echo "$tool not found: apt-get install -y slurmctld slurmd slurm-client munge" >&2; exit 1; }
done
host=$(hostname -s)
cpus=$(nproc)
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))

# munge: authentication between the daemons and the client commands
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge && chown munge:munge /run/munge /var/log/munge /var/lib/munge
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged

mkdir -p /etc/slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm /run/slurm
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=sched_interval=2
ReturnToService=2
MinJobAge=600
KillWait=30
JobRequeue=1
# a requeued job may start again after cred_expire seconds (default 120): quicker on a test cluster
AuthInfo=cred_expire=10
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:${SLURM_OVERSUBSCRIBE:-2}
CONF

pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld
pgrep -x slurmd >/dev/null || /usr/sbin/slurmd
for _ in $(seq 60); do
    if sinfo -h -o %T 2>/dev/null | grep -qE "idle|mix|alloc"; then
        echo "SLURM up: $(sinfo -h -o 'partition %P, %D node, %c CPUs, state %T')"
        exit 0
    fi
    sleep 1
done
echo "SLURM did not come up; see /var/log/slurm/slurmctld.log and slurmd.log" >&2
exit 1
