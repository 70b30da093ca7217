#!/usr/bin/env bash
# Starts a one-node SLURM cluster on this machine for tests/test_slurm.py: Debian's slurm-wlm and munge, as root.
# Its configuration, state and logs live in $PAPERLIB_SLURM (default /tmp/paperlib-slurm); clients reach it with
# SLURM_CONF=$PAPERLIB_SLURM/slurm.conf, so a cluster this machine already belongs to is neither used nor touched.
# Does nothing when that cluster already answers; installs slurm-wlm when it is missing.
set -euo pipefail
dir=${PAPERLIB_SLURM:-/tmp/paperlib-slurm}
export SLURM_CONF=$dir/slurm.conf
if [ -f "$SLURM_CONF" ] && sinfo -h -t idle,mix,alloc 2>/dev/null | grep -q .; then exit 0; fi
if ! command -v slurmctld >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
         slurm-wlm munge >/dev/null; }
fi
host=$(hostname -s)
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
mkdir -p "$dir/spool" "$dir/state"
cat > "$SLURM_CONF" <<EOF
ClusterName=paperlib-test
SlurmctldHost=$host
AuthType=auth/munge
SlurmUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
SlurmctldPort=6917
SlurmdPort=6918
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmdSpoolDir=$dir/spool
StateSaveLocation=$dir/state
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=$host CPUs=$(nproc) RealMemory=$mem_mb State=UNKNOWN
PartitionName=test Nodes=$host Default=YES MaxTime=60 State=UP
EOF
if [ ! -f /etc/munge/munge.key ]; then mungekey --create; chown munge:munge /etc/munge/munge.key; fi
# the daemons get no terminal or pipe of the caller's: a CI log reader would otherwise wait for them
exec </dev/null 3>>"$dir/daemons.out"
if ! pgrep -x munged >/dev/null; then
  mkdir -p /run/munge && chown munge:munge /run/munge
  su -s /bin/sh munge -c munged >&3 2>&3
fi
pkill -f "slurmctld -f $SLURM_CONF" 2>/dev/null || true
pkill -f "slurmd -f $SLURM_CONF" 2>/dev/null || true
slurmctld -f "$SLURM_CONF" >&3 2>&3
slurmd -f "$SLURM_CONF" >&3 2>&3
for _ in $(seq 30); do
  if sinfo -h -t idle 2>/dev/null | grep -q .; then exit 0; fi
  sleep 1
done
echo "the one-node SLURM cluster did not come up: see $dir/slurmctld.log and $dir/slurmd.log" >&2
exit 1
