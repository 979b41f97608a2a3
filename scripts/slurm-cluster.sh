#!/usr/bin/env bash
# A one-node SLURM (munge + slurmctld + slurmd) on this machine, for tests and CI.
#
#   scripts/slurm-cluster.sh install   # apt-get install slurm-wlm munge (root)
#   scripts/slurm-cluster.sh start     # write slurm.conf, start munged/slurmctld/slurmd, wait for the node
#   scripts/slurm-cluster.sh status    # exit 0 when the node is up
#   scripts/slurm-cluster.sh stop      # stops only the daemons this script started (PID files)
#
# Idempotent: start on a running cluster and stop on a stopped one do nothing. A SLURM
# or munge that this script did not start is used as it is and never stopped.
set -euo pipefail

STATE_DIR=${SLURM_CLUSTER_STATE:-/run/espnet3-rules-slurm}
PORT=${SLURM_CLUSTER_PORT:-6817}  # slurmctld's port; slurmd takes the next one
CONF=/etc/slurm/slurm.conf

log() { echo "slurm-cluster: $*" >&2; }

running() { [ -f "$STATE_DIR/$1.pid" ] && kill -0 "$(cat "$STATE_DIR/$1.pid")" 2>/dev/null; }

# scontrol ping answers at once; sinfo and squeue retry for ~9 s when no slurmctld runs.
controller_up() { [ -f "$CONF" ] && scontrol ping >/dev/null 2>&1; }

node_up() { controller_up && sinfo -h -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc)'; }

launch() {  # name, pid file the daemon writes, command...: start a daemon, record its PID
    local name=$1 pidfile=$2
    shift 2
    rm -f "$pidfile"  # a stale one from a killed daemon would be taken for the new PID
    "$@"
    for _ in $(seq 50); do [ -s "$pidfile" ] && break; sleep 0.1; done
    [ -s "$pidfile" ] || { log "$name did not start; see its log"; exit 1; }
    cp "$pidfile" "$STATE_DIR/$name.pid"
}

install() {
    if command -v slurmctld >/dev/null && command -v munged >/dev/null; then
        log "slurm-wlm and munge already installed"
        return
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_conf() {
    local host cpus mem_mb
    host=$(hostname -s)
    cpus=$(nproc)
    mem_mb=$(awk '/MemAvailable/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
    # KillWait: seconds from SIGTERM to SIGKILL at scancel/time limit (SLURM's default 30; 5 keeps the
    # tests' scancelled shards, held mid-item, short; the shards' items take well under a second).
    cat >"$CONF" <<CONF
ClusterName=local
SlurmctldHost=$host
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
MinJobAge=3600
KillWait=5
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
}

start_munge() {
    running munged && return
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        log "munge already works (not started here): using it"
        return
    fi
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    launch munged /run/munge/munged.pid su -s /bin/sh munge -c "munged --pid-file=/run/munge/munged.pid"
}

start_daemon() {  # name, pid file written by the daemon
    running "$1" || launch "$1" "$2" "$1"
}

start() {
    command -v slurmctld >/dev/null || { log "slurmctld not installed: run '$0 install' first"; exit 1; }
    mkdir -p "$STATE_DIR"
    if running slurmctld && running slurmd; then
        log "already running"
        return
    fi
    if ! running slurmctld && controller_up; then
        log "a slurmctld not started by this script answers: using it as it is"
    else
        write_conf
        start_munge
        start_daemon slurmctld /run/slurmctld.pid
        start_daemon slurmd /run/slurmd.pid
    fi
    for _ in $(seq 100); do
        if node_up; then
            log "node $(hostname -s) up: $(sinfo -h -o '%P %t %c CPUs %m MB')"
            return
        fi
        scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true
        sleep 0.3
    done
    log "the node did not come up; see /var/log/slurm/"
    exit 1
}

stop() {
    for name in slurmd slurmctld munged; do
        if running "$name"; then
            kill "$(cat "$STATE_DIR/$name.pid")"
            for _ in $(seq 50); do running "$name" || break; sleep 0.1; done
            log "stopped $name"
        fi
        rm -f "$STATE_DIR/$name.pid"
    done
}

status() {
    for name in munged slurmctld slurmd; do
        if running "$name"; then echo "$name: running (pid $(cat "$STATE_DIR/$name.pid"))"; else echo "$name: stopped"; fi
    done
    if controller_up; then sinfo; else echo "no slurmctld answers"; fi
    node_up
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
