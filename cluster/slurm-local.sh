#!/usr/bin/env bash
# A real one-node SLURM (munged, slurmctld, slurmd) on this machine, everything in one folder:
# the path of jobs/slurm.py without --local, run for real (tests, trying the SLURM path here).
#
#   sudo cluster/slurm-local.sh start DIR   # prints `export SLURM_CONF=DIR/slurm.conf`
#   sudo cluster/slurm-local.sh stop DIR    # stops the daemons by the pids in their pid files
#
# Needs root and Debian's `slurm-wlm` and `munge` (apt-get install -y slurm-wlm munge). No systemd
# and nothing outside DIR: munged listens on DIR/munge-run/munge.socket with its own key (the munge
# user must be able to enter DIR: `mktemp -d` under /tmp, not a folder inside a 0700 one). Ports:
# SLURMCTLD_PORT and SLURMD_PORT (default 6817 and 6818). `start` returns once `sinfo` shows the
# node idle, or fails with the daemons' log tails after START_TIMEOUT_S (default 120) seconds.
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[[ $# -eq 2 ]] || usage
cmd=$1
dir=$(realpath -m "$2")
conf=$dir/slurm.conf
sock=$dir/munge-run/munge.socket
node=$(hostname -s)
deadline_s=${START_TIMEOUT_S:-120}

die() {
    echo "slurm-local: $*" >&2
    for log in "$dir"/munge/munged.log "$dir"/log/slurmctld.log "$dir"/log/slurmd.log; do
        [[ -f $log ]] && { echo "--- tail of $log" >&2; tail -n 15 "$log" >&2; }
    done
    exit 1
}

# poll CHECK (a command) until it succeeds; fail with WHAT after the deadline
wait_for() {
    local what=$1 end=$((SECONDS + deadline_s))
    shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < end)) || die "timed out after ${deadline_s}s waiting for $what"
        sleep 0.5
    done
}

munge_works() { munge -n -S "$sock" | unmunge -S "$sock"; }
node_idle() { [[ $(sinfo -h -n "$node" -o %T) == idle ]]; }

write_conf() {
    cat >"$conf" <<EOF
# one-node SLURM written by cluster/slurm-local.sh
ClusterName=distsr-local
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job waits cred_expire seconds before it starts again (default 120)
AuthInfo=socket=$sock,cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# scheduling passes every 2 s: a requeued job starts as soon as it is eligible (default 60 s)
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
JobRequeue=1
KillWait=10
MpiDefault=none
MailProg=/bin/true
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
NodeName=$node NodeAddr=127.0.0.1 CPUs=$(nproc) State=UNKNOWN
PartitionName=local Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    # munged wants its key, socket and log owned by the munge user and closed to others
    install -d -o munge -g munge -m 700 "$dir/munge"
    install -d -o munge -g munge -m 755 "$dir/munge-run"  # clients reach the socket here
    runuser -u munge -- mungekey -c -k "$dir/munge/munge.key"
    chmod 400 "$dir/munge/munge.key"
    runuser -u munge -- munged --socket="$sock" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" \
        --seed-file="$dir/munge/munged.seed"
    wait_for "munged to answer on $sock" munge_works
}

start() {
    for bin in munged mungekey slurmctld slurmd sinfo; do
        command -v "$bin" >/dev/null || { echo "slurm-local: $bin not found" >&2; exit 3; }
    done
    [[ $(id -u) -eq 0 ]] || { echo "slurm-local: slurmd must run as root" >&2; exit 3; }
    [[ ! -e $conf ]] || die "$dir already holds a SLURM; stop it first"
    install -d -m 755 "$dir" "$dir/state" "$dir/spool" "$dir/log"
    start_munge
    write_conf
    export SLURM_CONF=$conf
    slurmctld -f "$conf" || die "slurmctld did not start"
    slurmd -f "$conf" || die "slurmd did not start"
    wait_for "node $node to be idle in sinfo" node_idle
    echo "export SLURM_CONF=$conf"
}

# SIGTERM the daemon named in PIDFILE, SIGKILL it if it outlives the deadline
stop_pid() {
    local pidfile=$1 pid end
    [[ -s $pidfile ]] || return 0
    pid=$(<"$pidfile")
    kill -TERM "$pid" 2>/dev/null || return 0
    end=$((SECONDS + 30))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= end)); then
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.2
    done
}

stop() {
    stop_pid "$dir/slurmd.pid"
    stop_pid "$dir/slurmctld.pid"
    stop_pid "$dir/munge/munged.pid"
}

case $cmd in
start) start ;;
stop) stop ;;
*) usage ;;
esac
