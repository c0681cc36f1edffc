#!/usr/bin/env bash
# A real SLURM cluster for tests on this machine: munge, slurmctld and one slurmd, or several
# emulated compute nodes, each in its own network and UTS namespace.
#
#   slurm/cluster.sh install             apt-get the packages (root, Debian/Ubuntu)
#   slurm/cluster.sh start [--nodes N]   write the config, start the daemons, wait for the node(s)
#   slurm/cluster.sh stop                stop what `start` started and remove what it made
#   slurm/cluster.sh env                 print `export SLURM_CONF=...` for clients (and MPIDL_NET
#                                        with several nodes)
#   slurm/cluster.sh exec NODE CMD...    run CMD on emulated node NODE, as ssh would (the words are
#                                        joined and run by a shell); also a launch agent for
#                                        `mpirun --mca plm_rsh_agent "slurm/cluster.sh exec"`
#
# Everything lives under $MPIDL_SLURM_DIR (default /tmp/mpidl-slurm-$UID). Clients need
# SLURM_CONF pointing at the generated slurm.conf.
#
# With --nodes N (N >= 2, root only): nodes node1..nodeN, each a network namespace plus a UTS
# namespace (its own hostname) and a mount namespace (its own /etc/hosts, Debian-style: its name
# on 127.0.1.1), linked by veth pairs to a bridge this script creates in a private
# /24 that no interface here uses yet. The bridge's address (.1) is the controller's; node k is
# .(k+1). Nothing is routed anywhere else. Every namespace, link and daemon made is listed in
# $DIR/made, and `stop` removes exactly those (and ends whatever still runs inside the nodes).
set -euo pipefail

DIR="${MPIDL_SLURM_DIR:-/tmp/mpidl-slurm-$(id -u)}"
CONF="$DIR/slurm.conf"
MADE="$DIR/made"

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

# The keys every cluster shares; the caller adds the node-specific ones.
write_conf() {
    mkdir -p "$DIR"/{state,spool,log,run}
    cat > "$CONF" <<EOC
ClusterName=mpidl-local
SlurmctldHost=$1
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start again cred_expire seconds after its requeue (SLURM's default: 120).
AuthInfo=cred_expire=10
# ...and is started at the next scheduler pass: every second here (SLURM's defaults: 30 s for
# backfill, 60 s for the main loop).
SchedulerParameters=bf_interval=1,sched_interval=1
StateSaveLocation=$DIR/state
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmctldPidFile=$DIR/run/slurmctld.pid
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
EOC
}

cpus() { getconf _NPROCESSORS_ONLN; }   # not nproc: it obeys OMP_NUM_THREADS
mem_mb() { awk -v n="$1" '/MemTotal/ {print int($2 / 1024 * 0.9 / n)}' /proc/meminfo; }

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

wait_idle() {   # $1: how many nodes must be up
    for _ in $(seq 1 60); do
        if [ "$(sinfo -h -N -o '%T' 2>/dev/null | grep -cE '^(idle|mixed|allocated)')" -ge "$1" ]; then
            return 0
        fi
        sleep 0.5
    done
    tail -5 "$DIR"/log/*.log >&2 || true
    return 1
}

start_one() {
    local host
    host="$(hostname -s)"
    write_conf "$host"
    cat >> "$CONF" <<EOC
SlurmdSpoolDir=$DIR/spool
SlurmdLogFile=$DIR/log/slurmd.log
SlurmdPidFile=$DIR/run/slurmd.pid
NodeName=$host CPUs=$(cpus) RealMemory=$(mem_mb 1) State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOC
    start_munge
    export SLURM_CONF="$CONF"
    alive "$DIR/run/slurmctld.pid" || slurmctld -f "$CONF"
    alive "$DIR/run/slurmd.pid" || slurmd -f "$CONF"
    wait_idle 1 || die "the node did not come up within 30 s"
    say "up: node $host idle, SLURM_CONF=$CONF"
}

# ------------------------------------------------------------------ emulated nodes

# Names are derived from $DIR, so clusters in different state folders never share a namespace,
# a link or a subnet. Interface names stay within Linux's 15 characters.
tag() { printf '%s' "$DIR" | cksum | awk '{printf "%05x", $1 % 1048576}'; }
netns_of() { echo "mpidl-$(tag)-$1"; }
uts_of() { echo "$DIR/ns/$1.uts"; }
record() { echo "$*" >> "$MADE"; }

# A 10.x.y.0/24 that no address or route here touches (the first free one from the tag on).
free_subnet() {
    local n used
    n=$(( 0x$(tag) % 60000 ))
    used="$(ip -o -4 addr show; ip -4 route show table all 2>/dev/null)"
    for _ in $(seq 1 200); do
        local net="10.$(( 64 + n / 250 % 190 )).$(( 1 + n % 250 ))"
        if ! grep -qF " $net." <<<" ${used//$'\n'/ }"; then echo "$net"; return 0; fi
        n=$(( n + 1 ))
    done
    return 1
}

# Refuse early, in one line and exit 2, where emulated nodes cannot work.
check_nodes_possible() {
    local why=""
    if [ "$EUID" -ne 0 ]; then why="needs root (network namespaces, veth links)"
    else
        for bin in ip nsenter unshare; do
            command -v "$bin" >/dev/null || { why="needs '$bin' (iproute2, util-linux)"; break; }
        done
    fi
    if [ -n "$why" ]; then
        printf '[slurm] error: start --nodes %s %s\n' "$1" "$why" >&2
        exit 2
    fi
}

start_nodes() {
    local n="$1" net br host i
    if [ -s "$MADE" ]; then die "$DIR holds a running cluster ($MADE); stop it first"; fi
    mkdir -p "$DIR"/{ns,run}
    net="$(free_subnet)" || die "no free 10.x.y.0/24 subnet for the node links"
    br="mpidl$(tag)"
    host="$(hostname -s)"
    trap 'stop >/dev/null 2>&1 || true' EXIT   # a half-made cluster is taken down again

    ip link add "$br" type bridge
    record link "$br"
    ip addr add "$net.1/24" dev "$br"
    ip link set "$br" up
    # Namespaces are kept by bind mounts on files; those must sit on a private mount.
    mount --bind "$DIR/ns" "$DIR/ns"
    record mount "$DIR/ns"
    mount --make-private "$DIR/ns"
    for i in $(seq 1 "$n"); do
        local node="node$i" ns uts
        ns="$(netns_of "$node")"; uts="$(uts_of "$node")"
        ip netns add "$ns"
        record netns "$ns"
        ip link add "${br}v$i" type veth peer name mpidl0 netns "$ns"
        record link "${br}v$i"
        ip link set "${br}v$i" master "$br"
        ip link set "${br}v$i" up
        ip -n "$ns" addr add "$net.$((i + 1))/24" dev mpidl0
        ip -n "$ns" link set mpidl0 up
        ip -n "$ns" link set lo up
        : > "$uts"
        unshare --uts="$uts" hostname "$node"
        record uts "$uts"
        : > "$DIR/ns/$node.mnt"
        unshare --mount="$DIR/ns/$node.mnt" --propagation private true
        record mnt "$DIR/ns/$node.mnt"
    done
    # Each node's own /etc/hosts, as Debian writes it: its own name on 127.0.1.1 first (the
    # trap for anything that hands its host name's address to other nodes), then every node.
    for i in $(seq 1 "$n"); do
        {
            printf '127.0.0.1\tlocalhost\n127.0.1.1\tnode%s\n%s.1\t%s\n' "$i" "$net" "$host"
            for j in $(seq 1 "$n"); do printf '%s.%s\tnode%s\n' "$net" "$((j + 1))" "$j"; done
        } > "$DIR/ns/node$i.hosts"
        nsenter --mount="$DIR/ns/node$i.mnt" mount --bind "$DIR/ns/node$i.hosts" /etc/hosts
    done
    echo "$net.0/24" > "$DIR/subnet"

    write_conf "$host($net.1)"
    cat >> "$CONF" <<EOC
SlurmdSpoolDir=$DIR/spool/%n
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmdPidFile=$DIR/run/slurmd-%n.pid
# One kernel and one /tmp for all nodes: PMIx's per-step folder (under TmpFS) must differ per node.
TmpFS=$DIR/tmp/%n
# A node that stops answering slurmctld's pings this many seconds is declared down and its jobs
# end (default 300; benchmarks/bench_faults.py measures how soon).
SlurmdTimeout=20
EOC
    for i in $(seq 1 "$n"); do
        echo "NodeName=node$i NodeAddr=$net.$((i + 1)) CPUs=$(cpus) RealMemory=$(mem_mb "$n") State=UNKNOWN" >> "$CONF"
    done
    echo "PartitionName=debug Nodes=node[1-$n] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES" >> "$CONF"

    munge_answers || die "munged does not answer (/run/munge/munge.socket.2)"
    export SLURM_CONF="$CONF"
    slurmctld -f "$CONF"
    record pidfile "$DIR/run/slurmctld.pid"
    for i in $(seq 1 "$n"); do
        mkdir -p "$DIR/spool/node$i" "$DIR/tmp/node$i"
        on_node "node$i" slurmd -f "$CONF" -N "node$i"
        record pidfile "$DIR/run/slurmd-node$i.pid"
    done
    wait_idle "$n" || die "the $n nodes did not come up within 30 s"
    trap - EXIT
    say "up: $n nodes idle (node1..node$n on $net.0/24), SLURM_CONF=$CONF"
}

# munged is shared by every cluster here, and another cluster's `stop` may just have ended it:
# wait until it answers, starting it again once it is gone.
munge_answers() {
    for _ in $(seq 1 100); do
        munge -n </dev/null >/dev/null 2>&1 && return 0
        pgrep -x munged >/dev/null || start_munge
        sleep 0.1
    done
    return 1
}

# Run argv inside a node: its network, its hostname, its /etc/hosts (in the current folder).
on_node() {
    local node="$1"; shift
    local ns
    ns="$(netns_of "$node")"
    [ -e "/run/netns/$ns" ] && [ -e "$(uts_of "$node")" ] || die "no emulated node '$node' under $DIR"
    nsenter --net="/run/netns/$ns" --uts="$(uts_of "$node")" --mount="$DIR/ns/$node.mnt" --wd="$PWD" -- "$@"
}

# The inode of every network namespace this cluster made, for finding what still runs there.
ns_inodes() {
    local ns
    for ns in $(awk '$1 == "netns" {print $2}' "$MADE" 2>/dev/null); do
        [ -e "/run/netns/$ns" ] && stat -L -c %i "/run/netns/$ns"
    done
}

end_in_namespaces() {
    local inodes pids p
    inodes="$(ns_inodes | tr '\n' ' ')"
    [ -n "$inodes" ] || return 0
    for sig in TERM KILL; do
        pids=""
        for p in /proc/[0-9]*; do
            local ino
            ino="$(stat -L -c %i "$p/ns/net" 2>/dev/null)" || continue
            [[ " $inodes " == *" $ino "* ]] && pids+=" ${p#/proc/}"
        done
        [ -n "$pids" ] || return 0
        # shellcheck disable=SC2086
        kill -s "$sig" $pids 2>/dev/null || true
        for _ in $(seq 1 30); do
            local left=""
            for p in $pids; do kill -0 "$p" 2>/dev/null && left+=" $p"; done
            [ -n "$left" ] || return 0
            sleep 0.1
        done
    done
}

# End these pids: TERM, up to 15 s to exit (slurmctld saves its state), then KILL.
end_pids() {
    local p left
    [ $# -gt 0 ] || return 0
    kill "$@" 2>/dev/null || true
    for _ in $(seq 1 150); do
        left=""
        for p in "$@"; do kill -0 "$p" 2>/dev/null && left+=" $p"; done
        [ -n "$left" ] || return 0
        sleep 0.1
    done
    # shellcheck disable=SC2086
    kill -KILL $left 2>/dev/null || true
}

stop_nodes() {
    local kind what daemons=()
    # Daemons first (by their pid files), then anything left inside the nodes (job steps).
    while read -r kind what; do
        if [ "$kind" = pidfile ] && alive "$what"; then daemons+=("$(cat "$what")"); fi
    done < "$MADE"
    end_pids "${daemons[@]}"
    end_in_namespaces
    tac "$MADE" | while read -r kind what; do
        case "$kind" in
            uts | mnt) umount "$what" 2>/dev/null || true; rm -f "$what" ;;
            mount) umount "$what" 2>/dev/null || true ;;
            netns) ip netns del "$what" 2>/dev/null || true ;;
            link) ip link del "$what" 2>/dev/null || true ;;
        esac
    done
    rm -f "$MADE" "$DIR/subnet"
}

start() {
    local n=1
    while [ $# -gt 0 ]; do
        case "$1" in
            --nodes) n="${2:-}"; shift 2 || true ;;
            --nodes=*) n="${1#--nodes=}"; shift ;;
            *) echo "usage: $0 start [--nodes N]" >&2; exit 2 ;;
        esac
    done
    if ! [[ "$n" =~ ^[1-9][0-9]?$ ]]; then echo "[slurm] error: --nodes '$n': a number from 1 to 99" >&2; exit 2; fi
    if [ "$n" = 1 ]; then install; start_one; return; fi
    check_nodes_possible "$n"
    install
    start_nodes "$n"
}

stop() {
    local ours others
    if [ -f "$MADE" ]; then stop_nodes; fi   # emulated nodes: their daemons end (and are waited for) here
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

env_() {
    echo "export SLURM_CONF=$CONF"
    if [ -s "$DIR/subnet" ]; then echo "export MPIDL_NET=$(cat "$DIR/subnet")"; fi
}

exec_() {
    [ $# -ge 2 ] || { echo "usage: $0 exec NODE COMMAND..." >&2; exit 2; }
    local node="$1"; shift
    on_node "$node" /bin/sh -c "$*"
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
    install) install ;;
    start) start "$@" ;;
    stop) stop ;;
    env) env_ ;;
    exec) exec_ "$@" ;;
    *) echo "usage: $0 install|start [--nodes N]|stop|env|exec NODE CMD..." >&2; exit 2 ;;
esac
