"""Allreduce bandwidth: Horovod vs raw MPI (mpi4py) vs torch.distributed, 4 KiB … 256 MiB, 2 … N ranks.

    .venv/bin/python benchmarks/bench_allreduce.py                      # 2 … cores ranks, 3 repeats
    options: [--ranks 2,4,8] [--repeats N] [--min-bytes 4K] [--max-bytes 256M]
             [--backends mpi,horovod,torch] [--horovod NAME:K=V,K=V ...] [--no-write | --json PATH]

Every backend runs in its own `mpirun` (raw MPI never shares a process with Horovod, whose
background thread polls and slows MPI calls made beside it). Runs alternate backends and rank
counts, repeat by repeat, so drift hits all. Each rank allreduces (sum, float32, in place) a
buffer of each size `iters = clamp(64 MiB / size, 2, 200)` times after 2 warm-up calls (1 from
16 MiB on); the time
of a size is the slowest rank's mean per call. From it, as nccl-tests defines them:

    algbw = S / t        busbw = algbw · 2(n−1)/n

and per backend and rank count a least-squares fit of t = a + b·S weighted by 1/t² (relative
error, so 4 KiB and 256 MiB count alike), read as the ring model t = 2(n−1)·α + 2(n−1)/n·S·β:
α = a / (2(n−1)), β = b·n / (2(n−1)), bandwidth 1/β (the asymptotic busbw).

torch.distributed uses Gloo on CPU and NCCL when CUDA is present (tensors on the GPU then, as
are Horovod's). Two Horovod variants by default: `horovod`, as mpidl's backend runs it
(mpidl.train.backends.horovod: its DEFAULTS environment, and it waits for a handle by polling
with a short sleep), and `horovod-stock`, Horovod as shipped (hvd.synchronize spins in the
calling thread). `--horovod NAME:K=V,...` adds a variant of mpidl's with more environment
(e.g. `cycle0.2:HOROVOD_CYCLE_TIME=0.2`). Results: benchmarks/results/allreduce-<machine>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_btl_vader_single_copy_mechanism": "none", "OMP_NUM_THREADS": "1"}
GOAL_BYTES = 16 * 2**20
GOAL_RATIO = 0.9


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


# ---------------------------------------------------------------- workers (one per mpirun)

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


def worker_mpi(sizes: list[int]) -> tuple[int, int, list[float]]:
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    buf = np.zeros(max(sizes) // 4, dtype=np.float32)
    times = _time_sizes(sizes, lambda b: comm.Allreduce(MPI.IN_PLACE, buf[:b // 4], op=MPI.SUM), comm.Barrier,
                        lambda: None)
    slowest = np.array(times)
    comm.Allreduce(MPI.IN_PLACE, slowest, op=MPI.MAX)
    return comm.Get_rank(), comm.Get_size(), list(map(float, slowest))


def worker_horovod(sizes: list[int]) -> tuple[int, int, list[float]]:
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
    rank, size = hvd.rank(), hvd.size()
    hvd.shutdown()
    return rank, size, [float(t) for t in slowest]


def worker_torch(sizes: list[int]) -> tuple[int, int, list[float]]:
    import datetime
    import socket

    import torch
    import torch.distributed as dist
    from mpi4py import MPI  # only to agree on the rendezvous address

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    addr = None
    if rank == 0:
        with socket.socket() as s:
            s.bind(("", 0))
            addr = (socket.gethostbyname(socket.gethostname()), s.getsockname()[1])
    addr = comm.bcast(addr, root=0)
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
    return rank, size, [float(v) for v in t.cpu()]


def run_worker(kind: str, sizes: list[int], out: str) -> None:
    fn = {"mpi": worker_mpi, "horovod": worker_horovod, "torch": worker_torch}[kind]
    try:
        rank, size, times = fn(sizes)
    except BaseException:
        # Leave without MPI_Finalize, so mpirun ends the other ranks instead of waiting on them.
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    if rank == 0:
        Path(out).write_text(json.dumps({"ranks": size, "sizes": sizes, "times": times}))


# ---------------------------------------------------------------- orchestration

def horovod_defaults() -> dict[str, str]:
    """The environment mpidl's Horovod backend sets by default (so the benchmark measures what training uses)."""
    from mpidl.train.backends.horovod import DEFAULTS

    return {k: str(v) for k, v in DEFAULTS.items()}


def launch(kind: str, ranks: int, sizes: list[int], env_extra: dict[str, str], cores: int) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.json")
        exports = [a for k in env_extra for a in ("-x", k)]
        cmd = ["mpirun", "-np", str(ranks), *(["--oversubscribe"] if ranks > cores else []), *exports,
               sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--times-out", out,
               "--sizes", ",".join(map(str, sizes))]
        env = {**os.environ, **MPI_ENV, **env_extra}
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
        if p.returncode != 0:
            raise SystemExit(f"{kind} on {ranks} ranks failed (exit {p.returncode}):\n{p.stdout[-2000:]}{p.stderr[-3000:]}")
        return json.loads(Path(out).read_text())["times"]


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", choices=("mpi", "horovod", "torch"), help=argparse.SUPPRESS)
    ap.add_argument("--times-out", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", help=argparse.SUPPRESS)
    ap.add_argument("--ranks", default=None, help="rank counts, e.g. 2,4 (default: 2 … cores, powers of two)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--min-bytes", default="4K")
    ap.add_argument("--max-bytes", default="256M")
    ap.add_argument("--backends", default="mpi,horovod,torch")
    ap.add_argument("--horovod", action="append", default=[], metavar="NAME:K=V,K=V",
                    help="an extra Horovod variant with these environment variables")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--json", metavar="PATH", help="write the result here instead of benchmarks/results/")
    a = ap.parse_args()
    if a.worker:
        run_worker(a.worker, [int(s) for s in a.sizes.split(",")], a.times_out)
        return

    from common import environment, write_result

    cores = len(os.sched_getaffinity(0))
    ranks = [int(r) for r in a.ranks.split(",")] if a.ranks else [2**k for k in range(1, 12) if 2**k <= max(2, cores)]
    sizes = sizes_between(parse_bytes(a.min_bytes), parse_bytes(a.max_bytes))
    base = horovod_defaults()
    variants: dict[str, tuple[str, dict[str, str]]] = {}
    for b in a.backends.split(","):
        if b == "torch":
            import torch

            variants["torch-nccl" if torch.cuda.is_available() else "torch-gloo"] = ("torch", {})
        elif b == "horovod":
            variants["horovod"] = ("horovod", dict(base))
            variants["horovod-stock"] = ("horovod", {"MPIDL_HOROVOD_WAIT": "spin"})
        else:
            variants[b] = (b, {})
    for item in a.horovod:
        name, _, kv = item.partition(":")
        envs = dict(base)
        envs.update(dict(pair.split("=", 1) for pair in kv.split(",") if pair))
        variants[f"horovod-{name}"] = ("horovod", envs)
    names = list(variants)
    print(f"allreduce, float32 sum in place: {len(sizes)} sizes {sizes[0]} … {sizes[-1]} B, ranks {ranks}, "
          f"{a.repeats} repeats, backends {', '.join(names)}; {cores} cores", flush=True)

    results = []
    for rep in range(a.repeats):
        for n in (ranks if rep % 2 == 0 else ranks[::-1]):
            k = rep % len(names)
            for name in names[k:] + names[:k]:
                kind, env_extra = variants[name]
                t0 = time.monotonic()
                load = os.getloadavg()[0]  # what else ran: on a shared machine it decides the figures
                times = launch(kind, n, sizes, env_extra, cores)
                at16 = next((i for i, s in enumerate(sizes) if s >= GOAL_BYTES), len(sizes) - 1)
                print(f"  rep {rep + 1} {name:>18} n={n}: busbw {busbw(sizes[at16], times[at16], n):.2f} GB/s at "
                      f"{human(sizes[at16])} ({time.monotonic() - t0:.0f} s, load {load:.1f})", flush=True)
                for s, t in zip(sizes, times):
                    results.append({"backend": name, "ranks": n, "rep": rep, "load_before": load, "bytes": s, "time_s": t,
                                    "algbw_GBps": s / t / 1e9, "busbw_GBps": busbw(s, t, n)})

    summary, fits, ratios, goals = [], {}, [], []
    for name in names:
        for n in ranks:
            med = []
            for s in sizes:
                ts = [r["time_s"] for r in results if (r["backend"], r["ranks"], r["bytes"]) == (name, n, s)]
                t = statistics.median(ts)
                med.append(t)
                summary.append({"backend": name, "ranks": n, "bytes": s, "time_s": t, "time_min_s": min(ts),
                                "time_max_s": max(ts), "algbw_GBps": s / t / 1e9, "busbw_GBps": busbw(s, t, n)})
            fits.setdefault(name, {})[str(n)] = fit(sizes, med, n)
    hvd_names = [n for n in names if n.startswith("horovod")]
    if "mpi" in names:
        for name in hvd_names:
            for n in ranks:
                for s in sizes:
                    pairs = {r["rep"]: r["busbw_GBps"] for r in results if (r["backend"], r["ranks"], r["bytes"]) == (name, n, s)}
                    raw = {r["rep"]: r["busbw_GBps"] for r in results if (r["backend"], r["ranks"], r["bytes"]) == ("mpi", n, s)}
                    ratio = statistics.median(pairs[k] / raw[k] for k in pairs)
                    row = {"variant": name, "ranks": n, "bytes": s, f"{name.replace('-', '_')}_over_mpi": ratio,
                           "ratio": ratio}
                    if name == "horovod":
                        row["horovod_over_mpi"] = ratio
                    ratios.append(row)
                    if s >= GOAL_BYTES:
                        goals.append({"goal": f"{name} busbw ≥ {GOAL_RATIO}× raw MPI", "variant": name, "ranks": n,
                                      "bytes": s, "value": ratio, "target": GOAL_RATIO, "met": ratio >= GOAL_RATIO})

    print(f"\n{'backend':>18} {'ranks':>5} " + " ".join(f"{human(s):>8}" for s in sizes[::2]))
    for row_name in names:
        for n in ranks:
            vals = [next(x["busbw_GBps"] for x in summary if (x["backend"], x["ranks"], x["bytes"]) == (row_name, n, s))
                    for s in sizes[::2]]
            print(f"{row_name:>18} {n:>5} " + " ".join(f"{v:>8.2f}" for v in vals))
    print("busbw GB/s (medians); fits t = 2(n−1)α + 2(n−1)/n·S·β:")
    for name, by in fits.items():
        for n, f in by.items():
            bw = f"{f['bandwidth_GBps']:.2f} GB/s" if f["bandwidth_GBps"] else "unreadable (noise)"
            print(f"  {name:>18} n={n}: α = {f['alpha_s'] * 1e6:8.2f} µs, 1/β = {bw} "
                  f"(worst relative residual {f['max_rel_error']:.2f})")
    if goals:
        print(f"Horovod / raw MPI busbw at ≥ {GOAL_BYTES >> 20} MiB (median of paired repeats):")
        for name in hvd_names:
            for n in ranks:
                gs = [g for g in goals if g["variant"] == name and g["ranks"] == n]
                print(f"  {name:>18} n={n}: " + ", ".join(f"{human(g['bytes'])} {g['value']:.3f}" for g in gs)
                      + f"  -> {'met' if all(g['met'] for g in gs) else 'NOT met'}")
    if a.no_write:
        return
    figures = {
        "setup": {"dtype": "float32", "op": "sum, in place", "sizes": sizes, "ranks": ranks, "repeats": a.repeats,
                  "iterations": "clamp(64 MiB / size, 2, 200) after 2 warm-up calls (1 from 16 MiB)",
                  "time": "slowest rank's mean per call", "cores": cores,
                  "variants": {k: {"kind": v[0], "env": v[1]} for k, v in variants.items()}},
        "horovod_settings": base, "results": results, "summary": summary, "fits": fits, "ratios": ratios,
        "goals": goals}
    if a.json:
        Path(a.json).write_text(json.dumps({**environment(), **figures}, indent=2) + "\n")
        print(f"wrote {a.json}")
        return
    path = write_result("allreduce", figures)
    print(f"wrote {path.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
