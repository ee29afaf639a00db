#!/usr/bin/env bash
# A one-node Slurm cluster on 127.0.0.1 for the tests (Debian's slurmctld, slurmd, munge),
# with its state under target/slurm/.
#   bash scripts/slurm.sh start   # install if missing, start, wait until the node is idle
#   bash scripts/slurm.sh stop
# Prints nothing but errors; after `start`, SLURM_CONF=target/slurm/slurm.conf reaches it.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="$PWD/target/slurm"
CONF="$DIR/slurm.conf"

stop() {
  for p in slurmd slurmctld munged; do
    if [[ -f "$DIR/$p.pid" ]]; then
      kill "$(cat "$DIR/$p.pid")" 2>/dev/null || true
      rm -f "$DIR/$p.pid"
    fi
  done
}

if [[ "${1:-}" == "stop" ]]; then
  stop
  exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
  if [[ $(id -u) -ne 0 ]]; then
    echo "scripts/slurm.sh: Slurm is not installed and installing it needs root (apt-get install slurmctld slurmd slurm-client munge)" >&2
    exit 1
  fi
  echo "installing Slurm and munge from Debian (about 10 s)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

stop
mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
CPUS=$(nproc)
MEM_MB=$(awk '/MemTotal/ { printf "%d", $2 / 1024 * 0.8 }' /proc/meminfo)
cat > "$CONF" <<EOF
ClusterName=knn-test
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MinJobAge=300
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPidFile=$DIR/slurmctld-daemon.pid
SlurmdPidFile=$DIR/slurmd-daemon.pid
SlurmctldPort=6817
SlurmdPort=6818
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF="$CONF"

install -d -o munge -g munge /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
  # The package normally makes the key; make one if this image lacks it.
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
  chown munge:munge /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
fi
runuser -u munge -- /usr/sbin/munged -F >"$DIR/log/munged.log" 2>&1 &
echo $! > "$DIR/munged.pid"
for _ in $(seq 1 50); do [[ -S /run/munge/munge.socket.2 ]] && break; sleep 0.1; done
slurmctld -D -i -f "$CONF" >"$DIR/log/slurmctld.out" 2>&1 &
echo $! > "$DIR/slurmctld.pid"
slurmd -D -N localhost -f "$CONF" >"$DIR/log/slurmd.out" 2>&1 &
echo $! > "$DIR/slurmd.pid"
for _ in $(seq 1 150); do
  if sinfo -h -o '%T' 2>/dev/null | grep -q '^idle'; then
    exit 0
  fi
  sleep 0.2
done
echo "scripts/slurm.sh: the Slurm node did not become idle in 30 s; logs in $DIR/log/" >&2
tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
exit 1
