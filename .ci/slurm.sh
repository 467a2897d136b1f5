#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for the launch tests (tests/test_slurm.py).
#
#   .ci/slurm.sh up       install (if missing) and start munged, slurmctld and slurmd; fast when already up
#   .ci/slurm.sh down     stop the daemons this script started (by their PID files, never by name)
#   .ci/slurm.sh status   daemons, sinfo and the queue
#
# Debian packages: slurmctld slurmd slurm-client slurm-wlm-basic-plugins munge. The config works without
# cgroups or systemd (proctrack/linuxproc, task/none), runs everything as root, keeps accounting off
# (read job state with `scontrol show job ID`; MinJobAge keeps finished jobs visible for 10 minutes) and
# allows requeues. `AuthInfo=cred_expire=10` lets a requeued job start again after ~10 s instead of ~121 s.
# `up` exits non-zero with one line saying why when it cannot install or start something.
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
LOG_DIR=/var/log/slurm
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid
MUNGE_KEY=/etc/munge/munge.key
PACKAGES=(slurmctld slurmd slurm-client slurm-wlm-basic-plugins munge)
NODE=$(hostname -s)
CPUS=$(nproc)

die() { echo "slurm.sh: $*" >&2; exit 1; }
say() { echo "slurm.sh: $*"; }

# The PID in FILE when that process is alive (ps, not kill -0: that fails for another user's process).
alive() { local pid; pid=$(cat "$1" 2>/dev/null) && [ -n "$pid" ] && ps -p "$pid" >/dev/null 2>&1 && echo "$pid"; }

# The node answers and can take jobs.
node_ready() {
    local state
    state=$(timeout 5 sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -1) || return 1
    case "$state" in idle* | mix* | alloc* | completing*) return 0 ;; *) return 1 ;; esac
}

install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null || die "cannot install ${missing[*]}: no apt-get (not Debian/Ubuntu?)"
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    local log=/tmp/slurm-apt.log
    # An old package list may name versions the mirror no longer has: update once and retry.
    if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >"$log" 2>&1; then
        apt-get update -q >>"$log" 2>&1 || true
        apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$log" 2>&1 \
            || die "apt-get install ${missing[*]} failed (last lines of $log):$(echo; tail -5 "$log")"
    fi
}

write_config() {
    mkdir -p "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
    local tmp
    tmp=$(mktemp)
    cat >"$tmp" <<EOF
# Written by .ci/slurm.sh: one node ($NODE, $CPUS CPUs), no cgroups, no accounting, requeue allowed.
ClusterName=ci
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Schedule every 2 s (default 60 s / 30 s): a requeued job may start as soon as its credential expired.
SchedulerParameters=sched_interval=2,bf_interval=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=600
JobRequeue=1
ReturnToService=2
SlurmdTimeout=60
KillWait=30
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    if ! cmp -s "$tmp" "$CONF"; then
        mv "$tmp" "$CONF"
        chmod 644 "$CONF"
    else
        rm -f "$tmp"
    fi
}

start_munge() {
    [ -n "$(alive "$MUNGE_PID")" ] && return 0
    if [ ! -s "$MUNGE_KEY" ]; then
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$MUNGE_KEY" --force >/dev/null
        else
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
        fi
    fi
    chown munge:munge "$MUNGE_KEY" && chmod 0400 "$MUNGE_KEY"
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 0755 /run/munge
    runuser -u munge -- munged --pid-file="$MUNGE_PID" || die "munged did not start (see /var/log/munge/munged.log)"
}

start_daemon() {  # NAME PIDFILE
    local name=$1 pidfile=$2 i
    [ -n "$(alive "$pidfile")" ] && return 0
    # Daemonises and writes its PID file once it runs; -N names the node for slurmd.
    if [ "$name" = slurmd ]; then slurmd -N "$NODE"; else slurmctld; fi \
        || die "$name did not start (see $LOG_DIR/$name.log)"
    for i in $(seq 50); do
        [ -n "$(alive "$pidfile")" ] && return 0
        sleep 0.1
    done
    die "$name did not stay up (see $LOG_DIR/$name.log):$(echo; tail -5 "$LOG_DIR/$name.log" 2>/dev/null)"
}

up() {
    if [ -n "$(alive "$CTLD_PID")" ] && [ -n "$(alive "$SLURMD_PID")" ] && node_ready; then
        say "already up (node $NODE)"
        return 0
    fi
    [ "$(id -u)" -eq 0 ] || die "needs root (installs packages, writes /etc/slurm, starts daemons as root)"
    install_packages
    write_config
    start_munge
    start_daemon slurmctld "$CTLD_PID"
    start_daemon slurmd "$SLURMD_PID"
    local i
    for i in $(seq 100); do
        node_ready && { say "up: node $NODE, $CPUS CPUs ($(sinfo -h -o '%P %T' | head -1))"; return 0; }
        # A node left DOWN/DRAIN by an earlier run of the daemons: put it back into service.
        if [ $((i % 20)) -eq 10 ]; then scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true; fi
        sleep 0.1
    done
    die "daemons run but node $NODE is not ready: $(sinfo -h -N -o '%N %T %E' 2>&1 | head -1)"
}

stop_pidfile() {  # NAME PIDFILE
    local name=$1 pidfile=$2 pid i
    pid=$(alive "$pidfile") || { rm -f "$pidfile"; return 0; }
    kill "$pid"
    for i in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || { say "stopped $name ($pid)"; rm -f "$pidfile"; return 0; }
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
    say "killed $name ($pid) after 10 s"
    rm -f "$pidfile"
}

down() {
    stop_pidfile slurmd "$SLURMD_PID"
    stop_pidfile slurmctld "$CTLD_PID"
    stop_pidfile munged "$MUNGE_PID"
}

status() {
    local name pidfile pid rc=0
    for name in munged:$MUNGE_PID slurmctld:$CTLD_PID slurmd:$SLURMD_PID; do
        pidfile=${name#*:}
        if pid=$(alive "$pidfile"); then echo "${name%%:*}: running ($pid)"; else echo "${name%%:*}: stopped"; rc=1; fi
    done
    if command -v sinfo >/dev/null; then
        timeout 5 sinfo -N -l 2>&1 || rc=1
        timeout 5 squeue 2>&1 || true
    fi
    return $rc
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
