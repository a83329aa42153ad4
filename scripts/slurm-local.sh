#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, without systemd: munge, MariaDB + slurmdbd (so `sacct`
# works), slurmctld and slurmd, all as root. For the tests and for users who want to try the SLURM profile.
#
#   scripts/slurm-local.sh up      install the Debian packages if missing, write the configs, start the daemons
#   scripts/slurm-local.sh down    stop the daemons (configs and state stay)
#   scripts/slurm-local.sh status  print what runs
set -euo pipefail

CLUSTER=ctvq
CONF_DIR=/etc/slurm
STATE=/var/lib/ctvq-slurm
LOG=/var/log/ctvq-slurm
CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))

need_root() { [ "$(id -u)" = 0 ] || { echo "slurm-local: must run as root (it installs packages and starts daemons)" >&2; exit 2; }; }

install_packages() {
  local missing=()
  for bin in slurmctld slurmd slurmdbd munged mariadbd sacct; do command -v "$bin" >/dev/null || missing+=("$bin"); done
  [ ${#missing[@]} = 0 ] && return 0
  echo "slurm-local: installing slurm-wlm slurmdbd munge mariadb-server (missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurm-wlm slurmdbd munge mariadb-server >/dev/null
}

write_configs() {
  mkdir -p "$CONF_DIR" "$STATE"/{ctld,d} "$LOG" /run/munge /var/lib/munge /var/log/munge
  cat > "$CONF_DIR/slurm.conf" <<CONF
# Written by ctvq scripts/slurm-local.sh: a single-node test cluster.
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=1000
ReturnToService=2
MinJobAge=600
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=localhost CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=cpu Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=localhost Default=NO MaxTime=INFINITE State=UP
CONF
  cat > "$CONF_DIR/slurmdbd.conf" <<CONF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$STATE/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=ctvq-local
StorageLoc=slurm_acct_db
CONF
  chmod 600 "$CONF_DIR/slurmdbd.conf"
  [ -s /etc/munge/munge.key ] || { mkdir -p /etc/munge; dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; }
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
  chmod 400 /etc/munge/munge.key
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local secs=$1 what=$2; shift 2
  for _ in $(seq "$((secs * 4))"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.25; done
  echo "slurm-local: $what did not come up within ${secs}s (logs in $LOG)" >&2; return 1
}

start_daemons() {
  pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
  wait_for 10 munge munge -n
  if ! pgrep -x mariadbd >/dev/null; then
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
    [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql >/dev/null
    (mariadbd --user=mysql >"$LOG/mariadb.log" 2>&1 &)
  fi
  wait_for 30 mariadb mariadb -e "select 1"
  mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'ctvq-local';
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  pgrep -x slurmdbd >/dev/null || slurmdbd
  wait_for 30 slurmdbd sacctmgr -n list cluster
  sacctmgr -n list cluster format=cluster | grep -qw "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
  if ! pgrep -x slurmctld >/dev/null; then
    if [ -e "$STATE/ctld/node_state" ]; then slurmctld; else slurmctld -i; fi
  fi
  pgrep -x slurmd >/dev/null || slurmd -N localhost
  wait_for 30 "node localhost" sh -c "sinfo -h -N -o '%T' | grep -Eq '^(idle|mixed|allocated)'"
  sacctmgr -n list account format=account | grep -qw ctvq || sacctmgr -i add account ctvq Cluster="$CLUSTER" >/dev/null
  sacctmgr -n list user format=user | grep -qw root || sacctmgr -i add user root Account=ctvq >/dev/null
  sacctmgr -n list assoc format=user,account | grep -Eq 'root +ctvq' || sacctmgr -i add user root Account=ctvq >/dev/null
  echo "slurm-local: up ($CPUS CPUs, ${MEM_MB} MB, partitions cpu (default) and gpu, account ctvq)"
}

stop_one() {  # stop_one NAME: SIGTERM, then wait (a restart while the old one exits would fail)
  pkill -x "$1" 2>/dev/null || return 0
  for _ in $(seq 80); do pgrep -x "$1" >/dev/null || return 0; sleep 0.25; done
  pkill -9 -x "$1" 2>/dev/null || true
}

stop_daemons() {
  for d in slurmd slurmctld slurmdbd mariadbd munged; do stop_one "$d"; done
  echo "slurm-local: down"
}

case "${1:-}" in
  up) need_root; install_packages; write_configs; start_daemons ;;
  down) need_root; stop_daemons ;;
  status) for d in munged mariadbd slurmdbd slurmctld slurmd; do printf '%-10s %s\n' "$d" "$(pgrep -x "$d" >/dev/null && echo running || echo stopped)"; done; sinfo 2>/dev/null || true ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
