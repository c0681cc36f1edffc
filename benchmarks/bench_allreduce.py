"""Allreduce bandwidth: Horovod vs raw MPI (mpi4py) vs torch.distributed, 4 KiB … 256 MiB, on one
node or across nodes.

    .venv/bin/python benchmarks/bench_allreduce.py                      # 2 … cores ranks, 3 repeats
    options: [--ranks 2,4,8 | --placements 1x2,2x1] [--hosts node1,node2 [--launch-agent CMD]]
             [--launcher mpirun|srun] [--bind-to none] [--repeats N] [--min-bytes 4K] [--max-bytes 256M]
             [--backends mpi,horovod,torch] [--horovod NAME:K=V,K=V ...] [--mpi NAME:K=V,K=V ...]
             [--no-write | --json PATH]

Across nodes: a placement NxK puts K ranks on each of N nodes (`--ranks 4` is `1x4`). The nodes
are `--hosts` (mpirun -H, started through ssh or `--launch-agent`), else, inside a SLURM
allocation (salloc, sbatch), the allocation's nodes; `--launcher srun` runs every measurement
as `srun -N N --ntasks-per-node=K --mpi=pmix` instead (inside an allocation or not; SLURM picks
the nodes unless --hosts names them). Placements run on the first N of the hosts, one-node
placements on the first, so shared memory and the network are measured on the same machines;
a run whose ranks land elsewhere than asked stops. On the emulated two-node cluster:

    slurm/cluster.sh start --nodes 2 && eval "$(slurm/cluster.sh env)"      # SLURM_CONF, MPIDL_NET
    .venv/bin/python benchmarks/bench_allreduce.py --placements 1x2,2x1 --hosts node1,node2 \\
        --launch-agent "$PWD/slurm/cluster.sh exec" --bind-to none --json benchmarks/results/allreduce-2nodes.json

MPIDL_NET (mpidl/net.py) names the network between nodes, as for training; the JSON records
where every rank ran, on which cores, and the interface it used (`placements`). `--bind-to none`:
each node's mpirun daemon takes the machine's cores for its own and binds its first rank to
core 0, so ranks of emulated nodes (one machine) would all take turns on core 0; a run where
ranks of different hosts on one kernel are bound to the same cores stops and says so.

Every backend runs in its own launch (raw MPI never shares a process with Horovod, whose
background thread polls and slows MPI calls made beside it). Runs alternate backends and
placements, repeat by repeat, so drift hits all. Each rank allreduces (sum, float32, in place) a
buffer of each size `iters = clamp(64 MiB / size, 2, 200)` times after 2 warm-up calls (1 from
16 MiB on); the time of a size is the slowest rank's mean per call. From it, as nccl-tests
defines them, with n ranks in all:

    algbw = S / t        busbw = algbw · 2(n−1)/n

and per backend and placement a least-squares fit of t = a + b·S weighted by 1/t² (relative
error, so 4 KiB and 256 MiB count alike), read as the ring model t = 2(n−1)·α + 2(n−1)/n·S·β:
α = a / (2(n−1)), β = b·n / (2(n−1)), bandwidth 1/β (the asymptotic busbw). One-node placements
give the intra-node fit (`fits`, by rank count); placements across nodes the inter-node fit
(`inter_node_fits`, by placement): with one rank per node every step of the ring crosses the
network, so α and β are the network's as an allreduce sees it (with K ranks per node, those of
a flat ring whose slowest hop is the network's). `mpidl scale predict --inter measured:FILE`
takes it from there.

torch.distributed uses Gloo on CPU and NCCL when CUDA is present (tensors on the GPU then, as
are Horovod's). Two Horovod variants by default: `horovod`, as mpidl's backend runs it
(mpidl.train.backends.horovod: its DEFAULTS environment, and it waits for a handle by polling
with a short sleep), and `horovod-stock`, Horovod as shipped (hvd.synchronize spins in the
calling thread). `--horovod NAME:K=V,...` adds a variant of mpidl's with more environment
(e.g. `cycle0.2:HOROVOD_CYCLE_TIME=0.2`), `--mpi NAME:K=V,...` one of raw MPI (e.g.
`yield:OMPI_MCA_mpi_yield_when_idle=1`: a rank that waits gives its core away). Results: benchmarks/results/allreduce-<machine>.json
(allreduce-<N>nodes-<machine>.json across nodes).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from mpidl.world import LOCAL_MPIRUN_ENV  # noqa: E402

from mpidl import net  # noqa: E402
from mpidl.errors import EXIT_BAD_INPUT, BadInput  # noqa: E402

MPI_ENV = {**LOCAL_MPIRUN_ENV, "OMP_NUM_THREADS": "1"}
GOAL_BYTES = 16 * 2**20
GOAL_RATIO = 0.9
RESULT = "ALLREDUCE-RESULT "  # rank 0's line on stdout: the launcher brings it back from any node


def parse_bytes(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    t = text.strip().upper().rstrip("IB")
    return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)


def sizes_between(lo: int, hi: int) -> list[int]:
    out, s = [], lo
    while s <= hi:
        out.append(s)
        s *= 2
    return out


def human(nbytes: int) -> str:
    return f"{nbytes >> 20} MiB" if nbytes >= 2**20 else f"{nbytes >> 10} KiB"


def iterations(nbytes: int) -> int:
    return max(2, min(200, 2**26 // nbytes))


@dataclass(frozen=True)
class Placement:
    nodes: int
    per_node: int

    @property
    def ranks(self) -> int:
        return self.nodes * self.per_node

    @property
    def label(self) -> str:
        return f"{self.nodes}x{self.per_node}"

    def __str__(self) -> str:
        return f"{self.nodes} node{'s' if self.nodes > 1 else ''} × {self.per_node}"


def parse_placements(text: str, where: str = "--placements") -> list[Placement]:
    """'1x2,2x1' -> placements (NODESxRANKS_PER_NODE), each once."""
    out = []
    for item in text.replace(" ", "").split(","):
        n, _, k = item.lower().partition("x")
        if not (n.isdigit() and k.isdigit() and int(n) >= 1 and int(k) >= 1) or (int(n) * int(k) < 2):
            raise BadInput(f"{where} = {text!r}: give NODESxRANKS_PER_NODE items of 2 ranks or more, e.g. 1x2,2x1")
        p = Placement(int(n), int(k))
        if p in out:
            raise BadInput(f"{where} = {text!r}: {p.label} twice")
        out.append(p)
    return out


# ---------------------------------------------------------------- workers (one per launch)

def _time_sizes(sizes: list[int], allreduce, barrier, sync) -> list[float]:
    """Mean seconds per call at each size, on this rank."""
    out = []
    for nbytes in sizes:
        n = iterations(nbytes)
        for _ in range(1 if nbytes >= 2**24 else 2):
            allreduce(nbytes)
        sync()
        barrier()
        t0 = time.perf_counter()
        for _ in range(n):
            allreduce(nbytes)
        sync()
        out.append((time.perf_counter() - t0) / n)
    return out


def _where_am_i(kind: str, across: bool, toward: str) -> dict:
    """This rank's host and the path its data takes: shared memory within a node (MPI, Horovod),
    else the interface (MPIDL_NET's; Gloo's; else the one this host routes to rank 0 through,
    which is what OpenMPI's TCP transport picks unless btl_tcp_if_include says otherwise)."""
    cpus = os.sched_getaffinity(0)
    me: dict = {"host": socket.gethostname(), "cpus": cpu_list(cpus), "bound": len(cpus) < (os.cpu_count() or 1),
                "kernel": boot_id()}
    if kind != "torch" and not across:
        me["transport"] = "shared memory"
        return me
    me["transport"] = "tcp (gloo)" if kind == "torch" else "tcp between nodes, shared memory within"
    chosen = net.chosen()
    gloo = os.environ.get("GLOO_SOCKET_IFNAME") if kind == "torch" else None
    me["interface"] = chosen.name if chosen else gloo or net.interface_towards(toward)
    if kind != "torch" and os.environ.get("OMPI_MCA_btl_tcp_if_include"):
        me["btl_tcp_if_include"] = os.environ["OMPI_MCA_btl_tcp_if_include"]
    return me


def cpu_list(cpus) -> str:
    """{0, 1, 2, 5} -> '0-2,5'."""
    out: list[list[int]] = []
    for c in sorted(cpus):
        if out and out[-1][1] == c - 1:
            out[-1][1] = c
        else:
            out.append([c, c])
    return ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in out)


def parse_cpu_list(text: str) -> set[int]:
    out: set[int] = set()
    for part in text.split(","):
        a, _, b = part.partition("-")
        out.update(range(int(a), int(b or a) + 1))
    return out


def boot_id() -> str:
    """This kernel's boot id: ranks on 'different' hosts with the same one share a machine
    (containers, emulated nodes), and its cores."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def worker_mpi(sizes: list[int]) -> tuple[int, list[float], list[dict]]:
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    hosts = comm.allgather(socket.gethostname())
    across = len(set(hosts)) > 1
    toward = comm.bcast(net.rendezvous_address(across) if comm.Get_rank() == 0 else None, root=0)
    buf = np.zeros(max(sizes) // 4, dtype=np.float32)
    times = _time_sizes(sizes, lambda b: comm.Allreduce(MPI.IN_PLACE, buf[:b // 4], op=MPI.SUM), comm.Barrier,
                        lambda: None)
    slowest = np.array(times)
    comm.Allreduce(MPI.IN_PLACE, slowest, op=MPI.MAX)
    ranks = comm.gather(_where_am_i("mpi", across, toward), root=0)
    return comm.Get_rank(), list(map(float, slowest)), ranks


def worker_horovod(sizes: list[int]) -> tuple[int, list[float], list[dict]]:
    import torch
    import horovod.torch as hvd

    hvd.init()
    dev = torch.device(f"cuda:{hvd.local_rank()}") if torch.cuda.is_available() else torch.device("cpu")
    buf = torch.zeros(max(sizes) // 4, dtype=torch.float32, device=dev)
    token = torch.zeros(1, device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    from mpidl.train.backends.horovod import wait  # how mpidl's backend waits (MPIDL_HOROVOD_WAIT)

    def allreduce(nbytes: int) -> None:
        # One name per size, as a training step names each gradient: Horovod caches the response.
        h = hvd.allreduce_async_(buf[:nbytes // 4], op=hvd.Sum, name=f"ar.{nbytes}")
        wait([h])
        hvd.synchronize(h)

    times = _time_sizes(sizes, allreduce, lambda: hvd.allreduce(token, op=hvd.Sum, name="barrier"), sync)
    slowest = hvd.allreduce(torch.tensor(times, dtype=torch.float64), op=hvd.Max, name="times")
    # (named: by default Horovod names an object collective by its type, None on rank 0, str elsewhere)
    across = len(set(hvd.allgather_object(socket.gethostname(), name="hosts"))) > 1
    toward = hvd.broadcast_object(net.rendezvous_address(across) if hvd.rank() == 0 else None, root_rank=0,
                                  name="rank0_address")
    ranks = hvd.allgather_object(_where_am_i("horovod", across, toward), name="whereabouts")
    rank = hvd.rank()
    hvd.shutdown()
    return rank, [float(t) for t in slowest], ranks


def worker_torch(sizes: list[int]) -> tuple[int, list[float], list[dict]]:
    import datetime

    import torch
    import torch.distributed as dist
    from mpi4py import MPI  # only to agree on the rendezvous address

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    across = len(set(comm.allgather(socket.gethostname()))) > 1
    addr = None
    if rank == 0:
        with socket.socket() as s:
            s.bind(("", 0))
            # across nodes never the host name's address: Debian resolves it to 127.0.1.1
            addr = (net.rendezvous_address(across), s.getsockname()[1])
    addr = comm.bcast(addr, root=0)
    if across:  # Gloo binds to what the host name resolves to: the interface towards rank 0 instead
        os.environ.setdefault("GLOO_SOCKET_IFNAME", net.interface_towards(addr[0]))
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://{addr[0]}:{addr[1]}", rank=rank,
                            world_size=size, timeout=datetime.timedelta(minutes=5))
    dev = torch.device(f"cuda:{int(os.environ.get('OMPI_COMM_WORLD_LOCAL_RANK', 0)) % torch.cuda.device_count()}") \
        if cuda else torch.device("cpu")
    buf = torch.zeros(max(sizes) // 4, dtype=torch.float32, device=dev)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times = _time_sizes(sizes, lambda b: dist.all_reduce(buf[:b // 4], op=dist.ReduceOp.SUM), dist.barrier, sync)
    t = torch.tensor(times, dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    dist.destroy_process_group()
    ranks = comm.gather(_where_am_i("torch", across, addr[0]), root=0)
    return rank, [float(v) for v in t.cpu()], ranks


def run_worker(kind: str, sizes: list[int]) -> None:
    fn = {"mpi": worker_mpi, "horovod": worker_horovod, "torch": worker_torch}[kind]
    try:
        net.apply()  # MPIDL_NET -> the libraries' interface variables, before any of them starts
        rank, times, ranks = fn(sizes)
    except BaseException:
        # Leave without MPI_Finalize, so the launcher ends the other ranks instead of waiting on them.
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    if rank == 0:
        print(RESULT + json.dumps({"sizes": sizes, "times": times, "ranks": ranks}), flush=True)


# ---------------------------------------------------------------- where the ranks go

@dataclass(frozen=True)
class Nodes:
    """How ranks are started, and on which hosts (None: this host, `mpirun -np`)."""

    launcher: str = "mpirun"            # mpirun | srun
    hosts: Optional[tuple[str, ...]] = None
    agent: Optional[str] = None         # mpirun's plm_rsh_agent (ssh when None)
    bind_to: Optional[str] = None       # mpirun's --bind-to (None: mpirun's default, core for 2 ranks)
    source: str = "this host"           # where the host list came from

    def check(self, placements: list[Placement]) -> None:
        most = max(p.nodes for p in placements)
        if self.launcher == "mpirun" and most > 1 and not self.hosts:
            raise BadInput(f"--placements: {most} nodes need hosts: give --hosts, run inside a SLURM allocation, "
                           "or use --launcher srun")
        if self.hosts and most > len(self.hosts):
            raise BadInput(f"--placements: {most} nodes, but {len(self.hosts)} host(s) from {self.source}: "
                           f"{','.join(self.hosts)}")


def allocation_hosts(env=os.environ) -> Optional[list[str]]:
    """The nodes of the SLURM allocation this runs in (salloc, sbatch), or None outside one."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        return None
    try:
        p = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise BadInput(f"SLURM_JOB_NODELIST = {nodelist!r}: no scontrol here to expand it: give --hosts") from None
    if p.returncode != 0 or not p.stdout.split():
        raise BadInput(f"SLURM_JOB_NODELIST = {nodelist!r}: scontrol cannot expand it ({p.stderr.strip()})")
    return p.stdout.split()


def launch_command(kind: str, placement: Placement, nodes: Nodes, sizes: list[int], env_extra: dict[str, str],
                   cores: int, env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The command that starts one measurement's ranks, and its environment (pure)."""
    worker = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--sizes", ",".join(map(str, sizes))]
    env = {**env, **MPI_ENV, **env_extra}
    if nodes.launcher == "srun":  # srun hands every rank this environment
        where = ["-w", ",".join(nodes.hosts[:placement.nodes])] if nodes.hosts else []
        return ["srun", "-K", "-N", str(placement.nodes), f"--ntasks-per-node={placement.per_node}", "--mpi=pmix",
                *where, *worker], env
    # -x: what ranks on other hosts would not see otherwise (ssh carries no environment)
    bind = ["--bind-to", nodes.bind_to] if nodes.bind_to else []
    forward = sorted({*env_extra, "OMP_NUM_THREADS", *([net.VAR] if env.get(net.VAR) else [])})
    exports = [a for k in forward for a in ("-x", k)]
    if nodes.hosts:
        hosts = ",".join(f"{h}:{placement.per_node}" for h in nodes.hosts[:placement.nodes])
        agent = ["--mca", "plm_rsh_agent", nodes.agent] if nodes.agent else []
        return ["mpirun", "-H", hosts, "-np", str(placement.ranks), *agent, *bind, *exports, *worker], \
            {**env, **net.launcher_env(env)}
    over = ["--oversubscribe"] if placement.ranks > cores else []
    return ["mpirun", "-np", str(placement.ranks), *over, *bind, *exports, *worker], env


def launch(kind: str, placement: Placement, nodes: Nodes, sizes: list[int], env_extra: dict[str, str],
           cores: int) -> tuple[list[float], list[dict], str, bool]:
    """Run one measurement: the slowest rank's seconds per size, each rank's whereabouts, the
    command, and whether all its ranks ran on one machine (one kernel)."""
    cmd, env = launch_command(kind, placement, nodes, sizes, env_extra, cores, dict(os.environ))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith(RESULT)), None)
    if p.returncode != 0 or line is None:
        raise SystemExit(f"{kind} on {placement} failed (exit {p.returncode}): {shlex.join(cmd)}\n"
                         f"{p.stdout[-2000:]}{p.stderr[-3000:]}")
    got = json.loads(line[len(RESULT):])
    check_placement(got["ranks"], placement, f"{kind} on {placement}")
    kernels = [r.pop("kernel") for r in got["ranks"]]  # boot ids: compared, not kept
    one_machine = bool(kernels[0]) and len(set(kernels)) == 1
    return got["times"], got["ranks"], portable(cmd[:cmd.index("--sizes")]), one_machine


def portable(cmd: list[str]) -> str:
    """A command as the JSON records it: paths inside this checkout relative to it."""
    root = str(HERE.parent) + os.sep
    return shlex.join(c.replace(root, "") for c in cmd)


def check_placement(ranks: list[dict], placement: Placement, what: str) -> None:
    """The ranks ran where they were asked to (else the figures lie): N hosts, K ranks on each;
    and ranks of different hosts on one machine (emulated nodes, containers) were not bound to
    the same cores, as each node's mpirun daemon does when it takes the machine's cores for its own."""
    per_host: dict[str, int] = {}
    for r in ranks:
        per_host[r["host"]] = per_host.get(r["host"], 0) + 1
    if len(per_host) != placement.nodes or set(per_host.values()) != {placement.per_node}:
        raise SystemExit(f"{what}: asked for {placement}, the ranks ran on {per_host}")
    for i, a in enumerate(ranks):
        for b in ranks[i + 1:]:
            if a["host"] != b["host"] and a["kernel"] and a["kernel"] == b["kernel"] and a["bound"] and b["bound"]:
                shared = parse_cpu_list(a["cpus"]) & parse_cpu_list(b["cpus"])
                if shared:
                    raise SystemExit(f"{what}: ranks on {a['host']} and {b['host']} share one machine and are bound "
                                     f"to the same cores ({cpu_list(shared)}): they would take turns on them. "
                                     "Emulated nodes? Run with --bind-to none")


def placement_record(runs: list[dict], placement: Placement, nodes: Nodes) -> dict:
    """Where a placement's ranks ran and over what, as the ranks reported it: per backend its
    transport and each host's interface."""
    mine = [r for r in runs if r["placement"] == placement.label]
    links: dict[str, str] = {}
    for r in mine:
        ifaces = dict.fromkeys(f"{x['host']} {x['interface']}" for x in r["ranks"] if x.get("interface"))
        links.setdefault(r["backend"], r["ranks"][0]["transport"] + (f": {', '.join(ifaces)}" if ifaces else ""))
    command = mine[0]["command"].replace(f"--worker {mine[0]['kind']}", "--worker KIND") if mine else None
    seen = list(dict.fromkeys(tuple(dict.fromkeys(x["host"] for x in r["ranks"])) for r in mine))
    return {"nodes": placement.nodes, "ranks_per_node": placement.per_node, "ranks": placement.ranks,
            "hosts": list(seen[0]) if seen else [],
            # srun without -w may pick other nodes for each run: then every set it used
            **({"hosts_by_run": [list(h) for h in seen]} if len(seen) > 1 else {}), "launcher": nodes.launcher,
            "host_list_from": nodes.source if nodes.hosts else None,
            "launch_agent": portable(shlex.split(nodes.agent)) if nodes.agent else None,
            # several hosts on one kernel: emulated nodes (or containers) sharing one machine's cores
            "one_machine": placement.nodes > 1 and bool(mine) and all(r["one_machine"] for r in mine),
            "bind_to": nodes.bind_to or f"{nodes.launcher}'s default",
            "rank_cpus": [f"{x['host']}: {x['cpus']}" for x in mine[0]["ranks"]] if mine else [],
            net.VAR: os.environ.get(net.VAR) or None, "links": links, "command": command}


# ---------------------------------------------------------------- figures

def fit(sizes: list[int], times: list[float], n: int) -> dict:
    """Weighted least squares t = a + b·S, weights 1/t² (relative error); ring-model α, β."""
    w = [1 / t**2 for t in times]
    sw = sum(w)
    sx = sum(wi * s for wi, s in zip(w, sizes))
    sy = sum(wi * t for wi, t in zip(w, times))
    sxx = sum(wi * s * s for wi, s in zip(w, sizes))
    sxy = sum(wi * s * t for wi, s, t in zip(w, sizes, times))
    b = (sw * sxy - sx * sy) / (sw * sxx - sx * sx)
    a = (sy - b * sx) / sw
    if b < 0:  # noise larger than the size effect: no bandwidth term can be read from these points
        a, b = sy / sw, 0.0
    elif a < 0:  # latency cannot be negative: the best fit through the origin
        a, b = 0.0, sxy / sxx
    alpha, beta = a / (2 * (n - 1)), b * n / (2 * (n - 1))
    worst = max(abs(a + b * s - t) / t for s, t in zip(sizes, times))
    return {"a_s": a, "b_s_per_byte": b, "alpha_s": alpha, "beta_s_per_byte": beta,
            "bandwidth_GBps": 1e-9 / beta if beta > 0 else None, "max_rel_error": worst}


def busbw(nbytes: int, t: float, n: int) -> float:
    return nbytes / t * 2 * (n - 1) / n / 1e9


def summarize(results: list[dict], names: list[str], placements: list[Placement], sizes: list[int]) -> dict:
    """Medians per (backend, placement, size); the intra- and inter-node α/β fits; Horovod / raw MPI
    ratios of paired repeats and the goal they are judged by."""
    summary, fits, inter, ratios, goals = [], {}, {}, [], []
    key = lambda r: (r["backend"], r["placement"], r["bytes"])  # noqa: E731
    for name in names:
        for pl in placements:
            med = []
            for s in sizes:
                ts = [r["time_s"] for r in results if key(r) == (name, pl.label, s)]
                t = statistics.median(ts)
                med.append(t)
                summary.append({"backend": name, "placement": pl.label, "nodes": pl.nodes, "per_node": pl.per_node,
                                "ranks": pl.ranks, "bytes": s, "time_s": t, "time_min_s": min(ts),
                                "time_max_s": max(ts), "algbw_GBps": s / t / 1e9, "busbw_GBps": busbw(s, t, pl.ranks)})
            f = fit(sizes, med, pl.ranks)
            if pl.nodes == 1:
                fits.setdefault(name, {})[str(pl.ranks)] = f
            else:
                inter.setdefault(name, {})[pl.label] = {**f, "nodes": pl.nodes, "ranks_per_node": pl.per_node}
    if "mpi" in names:
        for name in [n for n in names if n.startswith("horovod")]:
            for pl in placements:
                across = f" across {pl.nodes} nodes" if pl.nodes > 1 else ""
                for s in sizes:
                    pairs = {r["rep"]: r["busbw_GBps"] for r in results if key(r) == (name, pl.label, s)}
                    raw = {r["rep"]: r["busbw_GBps"] for r in results if key(r) == ("mpi", pl.label, s)}
                    ratio = statistics.median(pairs[k] / raw[k] for k in pairs)
                    row = {"variant": name, "placement": pl.label, "nodes": pl.nodes, "per_node": pl.per_node,
                           "ranks": pl.ranks, "bytes": s, f"{name.replace('-', '_')}_over_mpi": ratio, "ratio": ratio}
                    if name == "horovod":
                        row["horovod_over_mpi"] = ratio
                    ratios.append(row)
                    if s >= GOAL_BYTES:
                        goals.append({"goal": f"{name} busbw ≥ {GOAL_RATIO}× raw MPI{across}", "variant": name,
                                      "placement": pl.label, "nodes": pl.nodes, "ranks": pl.ranks, "bytes": s,
                                      "value": ratio, "target": GOAL_RATIO, "met": ratio >= GOAL_RATIO})
    return {"summary": summary, "fits": fits, "inter_node_fits": inter, "ratios": ratios, "goals": goals}


def print_fits(title: str, fits: dict) -> None:
    if not fits:
        return
    print(title)
    for name, by in fits.items():
        for where, f in by.items():
            bw = f"{f['bandwidth_GBps']:.2f} GB/s" if f["bandwidth_GBps"] else "unreadable (noise)"
            label = f"n={where}" if "x" not in where else where
            print(f"  {name:>18} {label:>5}: α = {f['alpha_s'] * 1e6:8.2f} µs, 1/β = {bw} "
                  f"(worst relative residual {f['max_rel_error']:.2f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", choices=("mpi", "horovod", "torch"), help=argparse.SUPPRESS)
    ap.add_argument("--sizes", help=argparse.SUPPRESS)
    ap.add_argument("--ranks", default=None,
                    help="one-node rank counts, e.g. 2,4 (default: 2 … cores, powers of two)")
    ap.add_argument("--placements", metavar="NxK,...",
                    help="N nodes × K ranks per node, e.g. 1x2,2x1 (instead of --ranks)")
    ap.add_argument("--hosts", help="the nodes to place ranks on, e.g. node1,node2 "
                                    "(default: the SLURM allocation's, inside one; else this host)")
    ap.add_argument("--launch-agent", metavar="CMD",
                    help="mpirun's agent to start its daemons on --hosts (default ssh); "
                         "\"$PWD/slurm/cluster.sh exec\" for the emulated nodes")
    ap.add_argument("--bind-to", metavar="WHAT", help="mpirun's --bind-to (none, core, socket...); none for emulated "
                                                      "nodes, which share one machine's cores")
    ap.add_argument("--launcher", choices=("mpirun", "srun"), default="mpirun",
                    help="srun: each measurement is `srun -N N --ntasks-per-node=K --mpi=pmix`")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--min-bytes", default="4K")
    ap.add_argument("--max-bytes", default="256M")
    ap.add_argument("--backends", default="mpi,horovod,torch")
    ap.add_argument("--horovod", action="append", default=[], metavar="NAME:K=V,K=V",
                    help="an extra Horovod variant with these environment variables")
    ap.add_argument("--mpi", action="append", default=[], metavar="NAME:K=V,K=V",
                    help="an extra raw-MPI variant with these environment variables")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--json", metavar="PATH", help="write the result here instead of benchmarks/results/")
    a = ap.parse_args()
    if a.worker:
        run_worker(a.worker, [int(s) for s in a.sizes.split(",")])
        return
    try:
        bench(a)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def plan(a: argparse.Namespace, cores: int) -> tuple[list[Placement], Nodes]:
    if a.ranks and a.placements:
        raise BadInput("give --ranks (one node) or --placements, not both")
    if a.placements:
        placements = parse_placements(a.placements)
    elif a.ranks:
        placements = parse_placements(",".join(f"1x{r.strip()}" for r in a.ranks.split(",")), "--ranks")
    else:
        placements = [Placement(1, 2**k) for k in range(1, 12) if 2**k <= max(2, cores)]
    if a.bind_to and a.launcher != "mpirun":
        raise BadInput(f"--bind-to {a.bind_to}: mpirun's option; under srun set SLURM's (--cpu-bind, SLURM_CPU_BIND)")
    if a.launch_agent and not a.hosts:
        raise BadInput("--launch-agent starts mpirun's daemons on --hosts: give --hosts too")
    if a.hosts:
        hosts = [h for h in a.hosts.replace(" ", "").split(",") if h]
        if not hosts or len(set(hosts)) != len(hosts):
            raise BadInput(f"--hosts = {a.hosts!r}: give distinct host names separated by commas")
        nodes = Nodes(a.launcher, tuple(hosts), a.launch_agent, a.bind_to, "--hosts")
    else:
        found = allocation_hosts()
        nodes = Nodes(a.launcher, tuple(found) if found else None, None, a.bind_to,
                      "the SLURM allocation" if found else "this host")
    nodes.check(placements)
    return placements, nodes


def bench(a: argparse.Namespace) -> None:
    from common import environment, write_result

    cores = len(os.sched_getaffinity(0))
    placements, nodes = plan(a, cores)
    try:
        sizes = sizes_between(parse_bytes(a.min_bytes), parse_bytes(a.max_bytes))
    except (ValueError, IndexError):
        raise BadInput(f"--min-bytes {a.min_bytes} --max-bytes {a.max_bytes}: give sizes like 4K, 16M, 1G") from None
    if len(sizes) < 2:
        raise BadInput(f"--min-bytes {a.min_bytes} --max-bytes {a.max_bytes}: the α/β fit needs two sizes or more")
    base = horovod_defaults()
    variants: dict[str, tuple[str, dict[str, str]]] = {}
    for b in a.backends.split(","):
        if b == "torch":
            import torch

            variants["torch-nccl" if torch.cuda.is_available() else "torch-gloo"] = ("torch", {})
        elif b == "horovod":
            variants["horovod"] = ("horovod", dict(base))
            variants["horovod-stock"] = ("horovod", {"MPIDL_HOROVOD_WAIT": "spin"})
        elif b == "mpi":
            variants[b] = (b, {})
        else:
            raise BadInput(f"--backends = {a.backends!r}: {b!r} is not one of mpi, horovod, torch")
    for kind, items in (("horovod", a.horovod), ("mpi", a.mpi)):
        for item in items:
            name, _, kv = item.partition(":")
            pairs = [pair.split("=", 1) for pair in kv.split(",") if pair]
            if not name or not pairs or any(len(p) != 2 or not p[0] for p in pairs):
                raise BadInput(f"--{kind} = {item!r}: give NAME:KEY=VALUE,KEY=VALUE")
            variants[f"{kind}-{name}"] = (kind, {**(base if kind == "horovod" else {}), **dict(pairs)})
    names = list(variants)
    where = f"on {','.join(nodes.hosts)} ({nodes.source}, {nodes.launcher})" if nodes.hosts else \
        f"under {nodes.launcher}" + ("" if nodes.launcher == "srun" else " on this host")
    print(f"allreduce, float32 sum in place: {len(sizes)} sizes {sizes[0]} … {sizes[-1]} B, placements "
          f"{', '.join(map(str, placements))} {where}, {a.repeats} repeats, backends {', '.join(names)}; "
          f"{cores} cores", flush=True)

    results, runs = [], []
    for rep in range(a.repeats):
        for pl in (placements if rep % 2 == 0 else placements[::-1]):
            k = rep % len(names)
            for name in names[k:] + names[:k]:
                kind, env_extra = variants[name]
                t0 = time.monotonic()
                load = os.getloadavg()[0]  # what else ran: on a shared machine it decides the figures
                times, ranks, command, one_machine = launch(kind, pl, nodes, sizes, env_extra, cores)
                runs.append({"backend": name, "kind": kind, "placement": pl.label, "rep": rep, "command": command,
                             "ranks": ranks, "one_machine": one_machine})
                at16 = next((i for i, s in enumerate(sizes) if s >= GOAL_BYTES), len(sizes) - 1)
                print(f"  rep {rep + 1} {name:>18} {pl.label:>4}: busbw {busbw(sizes[at16], times[at16], pl.ranks):.2f}"
                      f" GB/s at {human(sizes[at16])} ({time.monotonic() - t0:.0f} s, load {load:.1f})", flush=True)
                for s, t in zip(sizes, times):
                    results.append({"backend": name, "placement": pl.label, "nodes": pl.nodes, "per_node": pl.per_node,
                                    "ranks": pl.ranks, "rep": rep, "load_before": load, "bytes": s, "time_s": t,
                                    "algbw_GBps": s / t / 1e9, "busbw_GBps": busbw(s, t, pl.ranks)})

    figs = summarize(results, names, placements, sizes)
    shown = sizes[::2] if len(sizes) > 2 else sizes
    print(f"\n{'backend':>18} {'NxK':>4} " + " ".join(f"{human(s):>8}" for s in shown))
    for row_name in names:
        for pl in placements:
            vals = [next(x["busbw_GBps"] for x in figs["summary"]
                         if (x["backend"], x["placement"], x["bytes"]) == (row_name, pl.label, s)) for s in shown]
            print(f"{row_name:>18} {pl.label:>4} " + " ".join(f"{v:>8.2f}" for v in vals))
    print("busbw GB/s (medians; NxK: N nodes × K ranks); fits t = 2(n−1)α + 2(n−1)/n·S·β, n = N·K:")
    print_fits(" intra-node (shared memory), by ranks:", figs["fits"])
    print_fits(" inter-node (the network between nodes), by placement:", figs["inter_node_fits"])
    if figs["goals"]:
        print(f"Horovod / raw MPI busbw at ≥ {GOAL_BYTES >> 20} MiB (median of paired repeats):")
        for name in [n for n in names if n.startswith("horovod")]:
            for pl in placements:
                gs = [g for g in figs["goals"] if g["variant"] == name and g["placement"] == pl.label]
                print(f"  {name:>18} {pl.label:>4}: " + ", ".join(f"{human(g['bytes'])} {g['value']:.3f}" for g in gs)
                      + f"  -> {'met' if all(g['met'] for g in gs) else 'NOT met'}")
    if a.no_write:
        return
    figures = {
        "setup": {"dtype": "float32", "op": "sum, in place", "sizes": sizes,
                  "ranks": sorted({p.ranks for p in placements if p.nodes == 1}),
                  "placements": [p.label for p in placements], "repeats": a.repeats,
                  "iterations": "clamp(64 MiB / size, 2, 200) after 2 warm-up calls (1 from 16 MiB)",
                  "time": "slowest rank's mean per call", "cores": cores,
                  "variants": {k: {"kind": v[0], "env": v[1]} for k, v in variants.items()}},
        "placements": {p.label: placement_record(runs, p, nodes) for p in placements},
        "horovod_settings": base, "results": results, **figs, "runs": runs}
    if a.json:
        Path(a.json).write_text(json.dumps({**environment(), **figures}, indent=2) + "\n")
        print(f"wrote {a.json}")
        return
    most = max(p.nodes for p in placements)
    path = write_result("allreduce" if most == 1 else f"allreduce-{most}nodes", figures)
    print(f"wrote {path.relative_to(HERE.parent)}")


def horovod_defaults() -> dict[str, str]:
    """The environment mpidl's Horovod backend sets by default (so the benchmark measures what training uses)."""
    from mpidl.train.backends.horovod import DEFAULTS

    return {k: str(v) for k, v in DEFAULTS.items()}


if __name__ == "__main__":
    main()
