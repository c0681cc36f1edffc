#!/usr/bin/env bash
# A real SLURM cluster for tests on this machine: munge, slurmctld and one slurmd, or several
# emulated compute nodes, each in its own network and UTS namespace.
#
#   slurm/cluster.sh install             apt-get the packages (root, Debian/Ubuntu)
#   slurm/cluster.sh start [--nodes N] [--gpus G]
#                                        write the config, start the daemons, wait for the node(s);
#                                        --gpus: G emulated GPUs a node (GRES counts, no devices: GPU
#                                        job specs can be checked and placed, not run on a GPU)
#   slurm/cluster.sh stop                stop what `start` started and remove what it made
#   slurm/cluster.sh env                 print `export SLURM_CONF=...` for clients (and MPIDL_NET
#                                        with several nodes)
#   slurm/cluster.sh exec NODE CMD...    run CMD on emulated node NODE, as ssh would (the words are
#                                        joined and run by a shell); also a launch agent for
#                                        `mpirun --mca plm_rsh_agent "slurm/cluster.sh exec"`
#
# Everything lives in a state folder only the caller can use: $MPIDL_SLURM_DIR (made mode 700
# when missing; one that is there must be the caller's, a real folder, with no group or other
# permission, or the script refuses in one line), else a folder `start` makes with mktemp under
# $TMPDIR (or /tmp) and writes down in ${XDG_RUNTIME_DIR:-~/.cache}/mpidl-slurm-dir for the other
# commands. A fixed name under /tmp would not do: whoever makes it first controls what `stop`
# deletes and kills, and the slurm.conf the daemons read. Clients need SLURM_CONF pointing at the
# generated slurm.conf (`env` prints it).
#
# With --nodes N (N >= 2, root only): nodes node1..nodeN, each a network namespace plus a UTS
# namespace (its own hostname) and a mount namespace (its own /etc/hosts, Debian-style: its name
# on 127.0.1.1), linked by veth pairs to a bridge this script creates in a private
# /24 that no interface here uses yet. The bridge's address (.1) is the controller's; node k is
# .(k+1). Nothing is routed anywhere else. Every namespace, link and daemon made is listed in
# $DIR/made, and `stop` removes exactly those (and ends whatever still runs inside the nodes).
set -euo pipefail
umask 077   # the config, pid files and records written here are the caller's alone

DIR="" CONF="" MADE=""   # the state folder and what lies in it: set by state_dir
GPUS=0                   # emulated GPUs a node (start --gpus)

say() { printf '[slurm] %s\n' "$*"; }
die() { printf '[slurm] error: %s\n' "$*" >&2; exit 1; }
refuse() { printf '[slurm] error: %s\n' "$*" >&2; exit 2; }   # bad input: one line, exit 2

# Why folder $1 is not the caller's alone (a real folder, not a symbolic link, owned by the caller,
# no group or other permission), in NOT_PRIVATE; empty when it is.
not_private() {
    local d="$1" owner mode
    NOT_PRIVATE=""
    if [ -L "$d" ]; then NOT_PRIVATE="a symbolic link, not a folder"; return; fi
    if [ ! -d "$d" ]; then NOT_PRIVATE="not a folder"; return; fi
    owner="$(stat -c %u -- "$d")"
    mode="$(stat -c %a -- "$d")"
    if [ "$owner" != "$(id -u)" ]; then NOT_PRIVATE="owned by uid $owner, not by the caller (uid $(id -u))"
    elif (( 8#$mode & 8#077 )); then NOT_PRIVATE="mode $mode: group or others may use it (it must be 700)"
    fi
}

use_dir() { DIR="$1"; CONF="$DIR/slurm.conf"; MADE="$DIR/made"; }

# Where `start` writes down the state folder it made (in RECORD): the caller's runtime folder or
# ~/.cache, which must be the caller's and writable by no one else.
record_file() {
    local base="${XDG_RUNTIME_DIR:-}" owner mode
    if [ -z "$base" ]; then
        [ -n "${HOME:-}" ] || refuse "no XDG_RUNTIME_DIR or HOME to note the state folder in: set MPIDL_SLURM_DIR"
        base="$HOME/.cache"
        mkdir -p -- "$base" 2>/dev/null || true
    fi
    [ -d "$base" ] || refuse "$base: not a folder (to note the state folder in): set MPIDL_SLURM_DIR"
    owner="$(stat -L -c %u -- "$base")"
    mode="$(stat -L -c %a -- "$base")"
    if [ "$owner" != "$(id -u)" ] || (( 8#$mode & 8#022 )); then
        refuse "$base: owned by uid $owner, mode $mode: others could change the note of the state folder there; set MPIDL_SLURM_DIR"
    fi
    RECORD="$base/mpidl-slurm-dir"
}

# The state folder (see the top): $1 = make (start) or find (the other commands; returns 1 where
# there is none). Refuses in one line, exit 2, a folder that is not the caller's alone.
state_dir() {
    local d
    if [ -n "${MPIDL_SLURM_DIR:-}" ]; then
        d="$MPIDL_SLURM_DIR"
        while [[ "$d" == */ && "$d" != / ]]; do d="${d%/}"; done
        if [ "$1" = make ] && [ ! -e "$d" ] && [ ! -L "$d" ]; then
            mkdir -p -- "$(dirname -- "$d")" && mkdir -m 700 -- "$d" 2>/dev/null || true  # raced: checked next
        fi
        if [ ! -e "$d" ] && [ ! -L "$d" ]; then return 1; fi
        not_private "$d"
        [ -z "$NOT_PRIVATE" ] || refuse "MPIDL_SLURM_DIR=$d: $NOT_PRIVATE"
        use_dir "$d"
        return 0
    fi
    record_file
    if [ -f "$RECORD" ] && [ ! -L "$RECORD" ]; then
        d="$(cat -- "$RECORD")"
        if [ -n "$d" ] && { [ -e "$d" ] || [ -L "$d" ]; }; then
            not_private "$d"
            [ -z "$NOT_PRIVATE" ] || refuse "state folder $d (noted in $RECORD): $NOT_PRIVATE"
            use_dir "$d"
            return 0
        fi
    fi
    [ "$1" = make ] || return 1
    d="$(mktemp -d "${TMPDIR:-/tmp}/mpidl-slurm-$(id -u).XXXXXXXX")" || die "cannot make a state folder under ${TMPDIR:-/tmp}"
    printf '%s\n' "$d" > "$RECORD.$$"
    mv -f -- "$RECORD.$$" "$RECORD"
    use_dir "$d"
}

# The pid in pid file $1 if that process is our $2 (slurmctld, slurmd or munged; the SLURM daemons
# started with our slurm.conf), printed; else returns 1. A pid file may be stale and its pid reused
# by anything since, so a pid is never killed on the file's word alone.
our_pid() {
    local file="$1" name="$2" pid arg args=()
    [ -f "$file" ] && [ ! -L "$file" ] || return 1
    pid="$(head -c 32 -- "$file" | tr -d '[:space:]')"
    [[ "$pid" =~ ^[1-9][0-9]{0,9}$ ]] || return 1
    mapfile -d '' args 2>/dev/null < "/proc/$pid/cmdline" || return 1
    [ "${#args[@]}" -gt 0 ] && [ "${args[0]##*/}" = "$name" ] || return 1
    if [ "$name" = munged ]; then echo "$pid"; return 0; fi   # started by runuser: no config to name
    for arg in "${args[@]:1}"; do
        if [ "$arg" = "$CONF" ]; then echo "$pid"; return 0; fi
    done
    return 1
}

# The pids of our daemons named $1 (started with our slurm.conf), pid file or not: one that never
# finished starting (no munged to answer it, say) may not have written its file.
by_conf() {
    local pid arg args=()
    for pid in $(pgrep -x "$1"); do
        mapfile -d '' args 2>/dev/null < "/proc/$pid/cmdline" || continue
        for arg in "${args[@]:1}"; do
            if [ "$arg" = "$CONF" ]; then echo "$pid"; break; fi
        done
    done
}

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

# munged serves every cluster on this machine, and the last cluster to stop ends it if a cluster
# started it (MUNGED_OURS: its pid, beside the starter's own record). A start holds
# this lock from its look at munged until its slurmctld runs, a stop from its look for other SLURM
# daemons until munged is ended: so a stop never ends munged under a cluster still starting.
# (Daemons started while it is held get fd 9 closed: an inherited descriptor would keep the lock.)
MUNGE_LOCK=/run/lock/mpidl-slurm-munge.lock
MUNGED_OURS=/run/lock/mpidl-slurm-munged.pid
munge_lock() { exec 9>>"$MUNGE_LOCK" && flock 9; }
munge_unlock() { flock -u 9; exec 9>&-; }
# Those of the pids given that run: a zombie does not (a container's init may be slow to reap the
# parent a daemon forked away from, and pgrep still lists it).
running() {
    local p
    for p in "$@"; do
        case "$(awk '{print $3}' "/proc/$p/stat" 2>/dev/null)" in "" | Z) ;; *) echo "$p" ;; esac
    done
}
# munged serves on for a moment after SIGTERM: a start let in by the lock must not find it still
# answering, then gone.
end_munged() {
    kill "$1" 2>/dev/null || return 0
    for _ in $(seq 1 100); do
        [ -n "$(running "$1")" ] || return 0
        sleep 0.1
    done
}

start_munge() {
    if pgrep -x munged >/dev/null; then return 0; fi
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    mkdir -p /var/lib/munge /var/log/munge
    mkdir -p -m 755 /run/munge   # its socket is every client's (umask 077 would close it)
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    runuser -u munge -- /usr/sbin/munged 9>&-
    # Remember that a cluster started it, so the last `stop` ends it (and only then).
    for _ in $(seq 1 20); do [ -s /run/munge/munged.pid ] && break; sleep 0.1; done
    cp /run/munge/munged.pid "$DIR/run/munged.pid" 2>/dev/null || true
    cp /run/munge/munged.pid "$MUNGED_OURS" 2>/dev/null || true
}

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

# --gpus G: the node line's GRES and the gres.conf beside slurm.conf (stand-in device files: the
# controller schedules them; nothing on the node is a GPU).
gres_of() { [ "$GPUS" = 0 ] || printf ' Gres=gpu:%s' "$GPUS"; }
write_gres() {
    [ "$GPUS" = 0 ] && return 0
    echo "GresTypes=gpu" >> "$CONF"
    mkdir -p "$DIR/dev"
    # stand-ins for /dev/nvidiaN: character devices that are /dev/null (slurmd wants a device)
    for i in $(seq 0 $((GPUS - 1))); do mknod "$DIR/dev/gpu$i" c 1 3 2>/dev/null || : > "$DIR/dev/gpu$i"; done
    echo "Name=gpu File=$DIR/dev/gpu[0-$((GPUS - 1))]" > "$DIR/gres.conf"
}

start_one() {
    local host
    host="$(hostname -s)"
    write_conf "$host"
    write_gres
    cat >> "$CONF" <<EOC
SlurmdSpoolDir=$DIR/spool
SlurmdLogFile=$DIR/log/slurmd.log
SlurmdPidFile=$DIR/run/slurmd.pid
NodeName=$host CPUs=$(cpus) RealMemory=$(mem_mb 1)$(gres_of) State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOC
    munge_lock
    munge_answers || die "munged does not answer (/run/munge/munge.socket.2)"
    export SLURM_CONF="$CONF"
    our_pid "$DIR/run/slurmctld.pid" slurmctld >/dev/null || slurmctld -f "$CONF" 9>&-
    munge_unlock
    our_pid "$DIR/run/slurmd.pid" slurmd >/dev/null || slurmd -f "$CONF"
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

# `made` lies in the private folder, yet `stop` acts only on lines naming this cluster's own
# things: paths inside $DIR, namespaces and links with its tag.
ours_made() {   # $1: kind, $2: what, $3: the tag
    case "$1" in
        pidfile | uts | mnt | mount) [[ "$2" == "$DIR/"* && "$2" != *"/../"* ]] ;;
        netns) [[ "$2" == "mpidl-$3-"* ]] ;;
        link) [[ "$2" == "mpidl$3"* ]] ;;
        *) return 1 ;;
    esac
}

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
    write_gres
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
        echo "NodeName=node$i NodeAddr=$net.$((i + 1)) CPUs=$(cpus) RealMemory=$(mem_mb "$n")$(gres_of) State=UNKNOWN" >> "$CONF"
    done
    echo "PartitionName=debug Nodes=node[1-$n] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES" >> "$CONF"

    munge_lock
    munge_answers || die "munged does not answer (/run/munge/munge.socket.2)"
    export SLURM_CONF="$CONF"
    slurmctld -f "$CONF" 9>&-
    munge_unlock
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
    local ns t
    t="$(tag)"
    for ns in $(awk '$1 == "netns" {print $2}' "$MADE" 2>/dev/null); do
        ours_made netns "$ns" "$t" || continue
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
    local kind what pid t daemons=()
    t="$(tag)"
    # Daemons first (by their pid files, each checked), then anything left inside the nodes (job steps).
    while read -r kind what; do
        if [ "$kind" = pidfile ] && ours_made "$kind" "$what" "$t"; then
            local name="${what##*/}"
            name="${name%.pid}"
            if pid="$(our_pid "$what" "${name%%-*}")"; then daemons+=("$pid"); fi
        fi
    done < "$MADE"
    end_pids "${daemons[@]}"
    end_in_namespaces
    tac "$MADE" | while read -r kind what; do
        ours_made "$kind" "$what" "$t" || { printf '[slurm] %s: not this cluster'"'"'s, left alone: %s %s\n' "$MADE" "$kind" "$what" >&2; continue; }
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
            --gpus) GPUS="${2:-}"; shift 2 || true ;;
            --gpus=*) GPUS="${1#--gpus=}"; shift ;;
            *) echo "usage: $0 start [--nodes N] [--gpus G]" >&2; exit 2 ;;
        esac
    done
    if ! [[ "$n" =~ ^[1-9][0-9]?$ ]]; then echo "[slurm] error: --nodes '$n': a number from 1 to 99" >&2; exit 2; fi
    if ! [[ "$GPUS" =~ ^[0-9]$ ]]; then echo "[slurm] error: --gpus '$GPUS': a number from 0 to 9" >&2; exit 2; fi
    [ "$n" = 1 ] || check_nodes_possible "$n"
    state_dir make   # before anything is installed or started: a folder not ours stops it all here
    install
    # PMIx's store for what ranks publish at MPI_Init (modex): the slurmd's step servers and so their
    # ranks keep it in the server's memory (hash) instead of its shared-memory store (ds21). Under
    # load here, 4 of 40 `srun --mpi=pmix` starts of 4 ranks on two nodes had a rank segfault in
    # MPI_Init after it could not open its node peer's shared-memory segment or reach its TCP
    # address; with hash, 0 of 80 (the same load). Real clusters' SLURM is not touched.
    export PMIX_MCA_gds="${PMIX_MCA_gds:-hash}"
    if [ "$n" = 1 ]; then start_one; else start_nodes "$n"; fi
}

stop() {
    local ours="" others pid d
    if ! state_dir find; then say "stopped (no state folder: nothing ran)"; return 0; fi
    if [ -f "$MADE" ]; then stop_nodes; fi   # emulated nodes: their daemons end (and are waited for) here
    for d in slurmd slurmctld; do
        for pid in $(by_conf "$d"); do   # its pid file's too: every one started with our slurm.conf
            kill "$pid"
            ours+="$pid"$'\n'
        done
    done
    # munged serves every SLURM cluster on this machine: leave it while another one runs.
    # (a pattern under 16 characters: pgrep warns on stderr about longer ones when none matches)
    munge_lock
    # shellcheck disable=SC2046
    others="$(running $(pgrep -x 'slurm(ctld|d)') | grep -vxF -e "${ours:-none}" || true)"
    if [ -z "$others" ]; then
        for f in "$DIR/run/munged.pid" "$MUNGED_OURS"; do
            if pid="$(our_pid "$f" munged)"; then end_munged "$pid"; rm -f "$MUNGED_OURS"; break; fi
        done
    fi
    munge_unlock
    say "stopped"
}

env_() {
    state_dir find || die "no cluster to find: run '$0 start' first (or set MPIDL_SLURM_DIR)"
    echo "export SLURM_CONF=$CONF"
    if [ -s "$DIR/subnet" ]; then echo "export MPIDL_NET=$(cat "$DIR/subnet")"; fi
}

exec_() {
    [ $# -ge 2 ] || { echo "usage: $0 exec NODE COMMAND..." >&2; exit 2; }
    local node="$1"; shift
    state_dir find || die "no cluster to find: run '$0 start' first (or set MPIDL_SLURM_DIR)"
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
    *) echo "usage: $0 install|start [--nodes N] [--gpus G]|stop|env|exec NODE CMD..." >&2; exit 2 ;;
esac
