#!/usr/bin/env bash
# A real one-node SLURM cluster for tests: munge, slurmctld and slurmd on this machine.
#
#   slurm/cluster.sh install   apt-get the packages (root, Debian/Ubuntu)
#   slurm/cluster.sh start     write the config, start the daemons, wait for the node
#   slurm/cluster.sh stop      stop the daemons this script started (by their pid files)
#   slurm/cluster.sh env       print `export SLURM_CONF=...` for clients
#
# Everything lives under $MPIDL_SLURM_DIR (default /tmp/mpidl-slurm-$UID). Clients need
# SLURM_CONF pointing at the generated slurm.conf.
set -euo pipefail

DIR="${MPIDL_SLURM_DIR:-/tmp/mpidl-slurm-$(id -u)}"
CONF="$DIR/slurm.conf"
HOST="$(hostname -s)"

say() { printf '[slurm] %s\n' "$*"; }
die() { printf '[slurm] error: %s\n' "$*" >&2; exit 1; }

install() {
    local missing=()
    for bin in slurmctld slurmd srun munged; do command -v "$bin" >/dev/null || missing+=("$bin"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        say "installing slurmctld slurmd slurm-client munge"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
    else
        die "missing ${missing[*]}: as root on Debian/Ubuntu, apt-get install slurmctld slurmd slurm-client munge"
    fi
}

write_conf() {
    mkdir -p "$DIR"/{state,spool,log,run}
    local cpus mem
    cpus="$(getconf _NPROCESSORS_ONLN)"   # not nproc: it obeys OMP_NUM_THREADS
    mem="$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"
    cat > "$CONF" <<EOF
ClusterName=mpidl-local
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start again cred_expire seconds after its requeue (SLURM's default: 120).
AuthInfo=cred_expire=10
# ...and is started at the next scheduler pass: every second here (SLURM's defaults: 30 s for
# backfill, 60 s for the main loop).
SchedulerParameters=bf_interval=1,sched_interval=1
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldPort=${MPIDL_SLURMCTLD_PORT:-6817}
SlurmdPort=${MPIDL_SLURMD_PORT:-6818}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
KillWait=5
MinJobAge=30
NodeName=$HOST CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
}

start_munge() {
    if pgrep -x munged >/dev/null; then return 0; fi
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    runuser -u munge -- /usr/sbin/munged
    # Remember that we started it, so `stop` ends it (and only then).
    for _ in $(seq 1 20); do [ -s /run/munge/munged.pid ] && break; sleep 0.1; done
    cp /run/munge/munged.pid "$DIR/run/munged.pid" 2>/dev/null || true
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
    install
    write_conf
    start_munge
    export SLURM_CONF="$CONF"
    alive "$DIR/run/slurmctld.pid" || slurmctld -f "$CONF"
    alive "$DIR/run/slurmd.pid" || slurmd -f "$CONF"
    for _ in $(seq 1 60); do
        if sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
            say "up: node $HOST idle, SLURM_CONF=$CONF"
            return 0
        fi
        sleep 0.5
    done
    tail -5 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
    die "the node did not come up within 30 s"
}

stop() {
    local ours others
    ours="$(cat "$DIR/run/slurmd.pid" "$DIR/run/slurmctld.pid" 2>/dev/null || true)"
    for d in slurmd slurmctld; do
        if alive "$DIR/run/$d.pid"; then
            kill "$(cat "$DIR/run/$d.pid")"
        fi
    done
    # munged serves every SLURM cluster on this machine: leave it while another one runs.
    others="$(pgrep -x 'slurmctld|slurmd' | grep -vxF "${ours:-none}" || true)"
    if [ -z "$others" ] && alive "$DIR/run/munged.pid"; then
        kill "$(cat "$DIR/run/munged.pid")"
    fi
    say "stopped"
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 install|start|stop|env" >&2; exit 2 ;;
esac
