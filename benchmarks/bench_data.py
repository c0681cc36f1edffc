"""HDF5 -> shuffled batches: mpidl against h5py's own best read of the same file, per layout.

    .venv/bin/python benchmarks/bench_data.py [--rows 200000] [--repeats 5] [--dir /tmp]
    .venv/bin/python benchmarks/bench_data.py --gpu-only --out DIR    # the CUDA part alone

Per layout (contiguous; row chunks (256, F); h5py's auto chunks; gzip and lzf with h5py's
default chunking), on a warm page cache, 12 KiB float32 rows plus an int64 label:
  h5py    `read_direct` of large contiguous slices of the same file into one reused buffer
          (the step, in whole chunks, calibrated once per layout: the best of several)
  raw     the file's bytes read in large blocks (the size calibrated like h5py's), by 1 thread
          and by as many threads as mpidl uses: what the page cache can deliver, the limit for
          an uncompressed file
  mpidl   ShardedLoader, 1 rank, batch 256, per-epoch block shuffle
The three alternate inside one process, round after round, and `--repeats` processes run in
turn, so drift in the machine's speed hits all alike; figures are medians, ratios are medians of
the per-round ratios. A ratio is refused, not printed, when a path beats the raw limit by more
than the limit's own spread: then the limit was not measured right. Where mpidl falls short of
the goal, the table below it shows where the reader's time went. Compressed layouts are not
bounded by one core: mpidl decodes chunks on every core it has (h5py cannot: HDF5's global lock).

Also measured: peak RSS per layout (a process that only runs mpidl) and at two dataset sizes,
the per-row h5py Dataset users write first, the exact per-row shuffle, 2 ranks, and on a CUDA
machine HDF5 uint8 images to device batches.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from mpidl.world import LOCAL_MPIRUN_ENV, OVERSUBSCRIBE_ENV  # noqa: E402

FEATURES = 3 * 32 * 32  # CIFAR-sized float32 rows: 12 KiB each
ROW_BYTES = FEATURES * 4 + 8
GOAL = 0.85  # mpidl / h5py's large-slice read of the same file
MPI_ENV = {**LOCAL_MPIRUN_ENV, **OVERSUBSCRIBE_ENV}
# name -> h5py create_dataset keywords (x and y alike, as users write them)
LAYOUTS = {
    "contiguous": {},
    "chunks (256, F)": {"chunks": (256, FEATURES)},
    "h5py auto chunks": {"chunks": True},
    "gzip, auto chunks": {"compression": "gzip"},
    "lzf, auto chunks": {"compression": "lzf"},
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- the paths (called in workers)
class RawRead:
    """GB/s of reading the file's bytes in `block`-byte reads, split over `threads` threads, each
    into its own reused, pre-touched buffer (a fresh one would cost a page fault per 4 KiB).

    The buffers start on a page: numpy's large arrays start 16 bytes past one, and on this
    development VM's CPU a copy whose destination lies 16 bytes past its source modulo 4 KiB runs
    at 8.6 GB/s instead of 20 (reads at page-aligned file offsets into such a buffer did: the limit
    came out low)."""

    def __init__(self, path: str, threads: int = 1, block: int = 4 << 20):
        self.path, self.threads = path, threads
        self.bufs = [memoryview(_page_aligned(block)) for _ in range(threads)]

    def __call__(self) -> float:
        size = os.path.getsize(self.path)
        cuts = [size * t // self.threads for t in range(self.threads + 1)]

        def part(buf: memoryview, a: int, b: int) -> None:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                while a < b:
                    n = os.preadv(fd, [buf[:min(len(buf), b - a)]], a)
                    if n <= 0:
                        break
                    a += n
            finally:
                os.close(fd)

        ts = [threading.Thread(target=part, args=(buf, a, b)) for buf, a, b in zip(self.bufs, cuts, cuts[1:])]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return size / (time.perf_counter() - t0) / 1e9


def _page_aligned(nbytes: int) -> np.ndarray:
    """`nbytes` of pre-touched memory starting on a 4 KiB page."""
    raw = np.ones(nbytes + 4096, np.uint8)
    start = -raw.ctypes.data % 4096
    return raw[start:start + nbytes]


def read_raw(path: str, threads: int = 1, block: int = 4 << 20) -> float:
    return RawRead(path, threads, block)()


class H5pyReference:
    """h5py's best large read of x and y: read_direct of `step`-row slices into reused buffers."""

    def __init__(self, path: str, step: int):
        import h5py

        self.f = h5py.File(path, "r", locking=False)
        self.x, self.y = self.f["x"], self.f["y"]
        chunk = max(self.x.chunks[0] if self.x.chunks else 1, self.y.chunks[0] if self.y.chunks else 1)
        self.step = max(chunk, step // chunk * chunk)  # whole chunks: each decompressed once
        self.bx = np.empty((self.step, FEATURES), np.float32)
        self.by = np.empty(self.step, np.int64)

    def __call__(self) -> float:
        n = len(self.x)
        t0 = time.perf_counter()
        for s in range(0, n, self.step):
            m = min(self.step, n - s)
            self.x.read_direct(self.bx, np.s_[s:s + m], np.s_[0:m])
            self.y.read_direct(self.by, np.s_[s:s + m], np.s_[0:m])
        return n * ROW_BYTES / (time.perf_counter() - t0) / 1e9


def mpidl_pass(loader, epoch: int) -> float:
    loader.set_epoch(epoch)
    t0 = time.perf_counter()
    rows = 0
    for x, _ in loader:
        rows += x.shape[0]
    return rows * ROW_BYTES / (time.perf_counter() - t0) / 1e9


# ---------------------------------------------------------------- workers (one process each)
def work_calibrate(path: str, **_) -> dict:
    """h5py's rate per slice size and raw reads' per block size (after a warm pass): each takes its best."""
    rates, raw = {}, {}
    for step in (1024, 4096, 16384):
        ref = H5pyReference(path, step)
        ref()
        rates[ref.step] = max(ref(), ref())
    for mib in (1, 4, 16, 64):
        read = RawRead(path, 1, mib << 20)
        read()
        raw[mib] = max(read(), read())
    return {"rates": rates, "best_step": max(rates, key=rates.get), "raw_rates_by_mib": raw,
            "raw_block_mib": max(raw, key=raw.get)}


def work_rounds(path: str, batch: int, step: int, rounds: int, raw_mib: int = 4, **_) -> dict:
    """raw (1 and N threads), h5py and mpidl, alternating in one process, `rounds` times."""
    import mpidl
    from mpidl.data import H5Source, ShardedLoader

    world = mpidl.init()
    loader = ShardedLoader(H5Source(path), world, batch_size=batch, seed=0, shuffle="block", prefetch=4)
    ref = H5pyReference(path, step)
    paths = {"raw": RawRead(path, 1, raw_mib << 20), "raw_threads": RawRead(path, loader.workers, raw_mib << 20),
             "h5py": ref, "mpidl": lambda: mpidl_pass(loader, 0)}
    for fn in paths.values():  # warm: first-touch page faults, thread start, chunk index
        fn()
    out: dict = {name: [] for name in paths}
    names = list(paths)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order too
            out[name].append(paths[name]())
    out["spent"] = loader.spent
    out["workers"] = loader.workers
    with loader.source.open() as reader:
        out["read_paths"] = {k: reader.paths(k)[0] for k in loader.source.keys}
    return out


def work_mpidl(path: str, batch: int, shuffle: str, passes: int = 2, **_) -> dict:
    """mpidl alone (its own peak RSS); the last of `passes` passes is timed; under mpirun: all ranks."""
    import mpidl
    from mpidl.data import H5Source, ShardedLoader

    world = mpidl.init()
    src = H5Source(path)
    loader = ShardedLoader(src, world, batch_size=batch, seed=0, shuffle=shuffle, prefetch=4)
    for p in range(passes):
        loader.set_epoch(p)
        world.barrier()
        t0 = time.perf_counter()
        rows = 0
        for x, _ in loader:
            rows += x.shape[0]
        seconds = time.perf_counter() - t0
    out = {"bytes": rows * src.row_bytes, "seconds": seconds, "rows": rows}
    gathered = world.comm.gather(out, root=0)
    if world.rank == 0 and world.size > 1:
        out = {"bytes": sum(g["bytes"] for g in gathered), "seconds": max(g["seconds"] for g in gathered),
               "rows": sum(g["rows"] for g in gathered), "ranks": world.size}
    out["gbps"] = out["bytes"] / out["seconds"] / 1e9
    out["peak_rss_mb"] = peak_rss_mb()
    return out if world.rank == 0 else {}


def work_naive(path: str, max_rows: int, batch: int, **_) -> dict:
    import h5py
    import torch
    from torch.utils.data import DataLoader, Dataset

    class RowDataset(Dataset):  # what users write first
        def __init__(self, p):
            self.p, self.f = p, None
            with h5py.File(p, "r") as f:
                self.n = len(f["y"])

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            if self.f is None:
                self.f = h5py.File(self.p, "r")
            return torch.from_numpy(self.f["x"][i]), int(self.f["y"][i])

    loader = DataLoader(RowDataset(path), batch_size=batch, shuffle=True, num_workers=0)
    t0 = time.perf_counter()
    rows = 0
    for x, _ in loader:
        rows += x.shape[0]
        if rows >= max_rows:
            break
    return {"gbps": rows * ROW_BYTES / (time.perf_counter() - t0) / 1e9, "rows": rows}


def work_gpu(path: str, batch: int, **_) -> dict:
    """HDF5 uint8 224×224 images -> CUDA float batches (scaled and flipped on the device), images/s."""
    import torch

    import mpidl
    from mpidl.data import H5Source, ShardedLoader
    from mpidl.data.preprocess import Pipeline

    world = mpidl.init()
    loader = ShardedLoader(H5Source(path), world, batch_size=batch, prefetch=4, device="cuda",
                           transform=Pipeline(scale_uint8=True, flip=True, crop=224, padding=4))
    for epoch in range(3):  # the first pass warms CUDA and the page cache
        loader.set_epoch(epoch)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        n = 0
        for x, _ in loader:
            n += x.shape[0]
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    return {"images_per_s": n / seconds, "batches_per_s": n / batch / seconds,
            "device": torch.cuda.get_device_name(0), "spent": loader.spent, "workers": loader.workers}


WORKERS = {"calibrate": work_calibrate, "rounds": work_rounds, "mpidl": work_mpidl, "naive": work_naive,
           "gpu": work_gpu}
RESNET50_H100_BF16_IMG_S = 3981  # plain PyTorch, batch 256, bf16 autocast (shared anchors)


def run_worker(mode: str, np_: int = 1, **kw) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--args", json.dumps(kw)]
    if np_ > 1:
        cmd = ["mpirun", "-np", str(np_), *cmd]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **MPI_ENV}, timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{p.stderr[-3000:]}")
    line = next(line for line in p.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[7:])


# ---------------------------------------------------------------- data
def make_dataset(path: Path, rows: int, layout: dict) -> None:
    """x: smooth-ish float32 rows (they compress like images do, not like noise); y: row ids."""
    import h5py

    block = 8192
    with h5py.File(path, "w") as f:
        x = f.create_dataset("x", (rows, FEATURES), np.float32, **layout)
        y = f.create_dataset("y", (rows,), np.int64, **{k: (True if k == "chunks" else v) for k, v in layout.items()})
        rng = np.random.default_rng(0)
        for s in range(0, rows, block):
            n = min(block, rows - s)
            base = rng.integers(0, 256, (n, 1), dtype=np.int64).astype(np.float32)
            x[s:s + n] = base + rng.integers(0, 8, (n, FEATURES)).astype(np.float32)
            y[s:s + n] = np.arange(s, s + n)


def describe(path: Path) -> str:
    import h5py

    with h5py.File(path, "r") as f:
        x = f["x"]
        return f"chunks {x.chunks}" + (f", {x.compression}" if x.compression else "") if x.chunks else "contiguous"


# ---------------------------------------------------------------- statistics
def med(values) -> float:
    return float(np.median(np.asarray(values, dtype=float)))


def spread(values) -> float:
    """The interquartile range relative to the median: how much a path moves on its own."""
    q1, q2, q3 = np.percentile(np.asarray(values, dtype=float), [25, 50, 75])
    return float((q3 - q1) / q2) if q2 else 0.0


def paired(a, b) -> float:
    """Median of the per-round ratios a/b (rounds pair measurements taken moments apart)."""
    return med(np.asarray(a, dtype=float) / np.asarray(b, dtype=float))


def measure_layout(name: str, path: Path, a: argparse.Namespace, compressed: bool) -> dict:
    cal = run_worker("calibrate", path=str(path))
    runs: dict = {}
    last: dict = {}
    for _ in range(a.repeats):
        last = run_worker("rounds", path=str(path), batch=a.batch, step=cal["best_step"], rounds=a.rounds,
                          raw_mib=cal["raw_block_mib"])
        for k in ("raw", "raw_threads", "h5py", "mpidl"):
            runs.setdefault(k, []).extend(last[k])
    rss = run_worker("mpidl", path=str(path), batch=a.batch, shuffle="block")["peak_rss_mb"]
    res = {"layout": describe(path), "file_gb": path.stat().st_size / 1e9, "rows": a.rows if not compressed
           else a.compressed_rows, "h5py_step_rows": cal["best_step"], "h5py_calibration": cal["rates"],
           "raw_block_mib": cal["raw_block_mib"], "raw_calibration": cal["raw_rates_by_mib"],
           "workers": last["workers"], "read_paths": last["read_paths"], "runs": runs,
           **{f"{k}_gbps": med(v) for k, v in runs.items()},
           "ratio_to_h5py": paired(runs["mpidl"], runs["h5py"]), "mpidl_peak_rss_mb": rss,
           "spent_last_pass_s": last["spent"], "compressed": compressed}
    limit = "raw_threads" if res["raw_threads_gbps"] >= res["raw_gbps"] else "raw"
    res["limit"] = limit
    noise = max(0.05, spread(runs[limit]))
    res["noise"] = noise
    res["refused"] = None
    if not compressed:  # the file's bytes bound every reader of an uncompressed file
        for path_name in ("h5py", "mpidl"):
            over = paired(runs[path_name], runs[limit]) - 1
            if over > noise:
                res["refused"] = (f"{path_name} beats the raw limit by {over:.0%} (its noise {noise:.0%}): "
                                  "the limit is not measured right")
        res["ratio_to_limit"] = paired(runs["mpidl"], runs[limit])
    return res


def print_table(layouts: dict) -> None:
    print(f"\n{'layout':<20}{'stored as':<28}{'raw GB/s':>9}{'h5py':>8}{'mpidl':>8}{'x h5py':>8}{'x raw':>7}"
          f"{'RSS MB':>8}  mpidl reads x as")
    for name, r in layouts.items():
        ratio = "refused" if r["refused"] else f"{r['ratio_to_h5py']:.2f}"
        to_raw = f"{r['ratio_to_limit']:.2f}" if "ratio_to_limit" in r and not r["refused"] else "-"
        raw = f"{r[r['limit'] + '_gbps']:.2f}" if not r["compressed"] else f"({r['raw_gbps']:.2f})"
        print(f"{name:<20}{r['layout']:<28}{raw:>9}{r['h5py_gbps']:>8.2f}{r['mpidl_gbps']:>8.2f}{ratio:>8}"
              f"{to_raw:>7}{r['mpidl_peak_rss_mb']:>8.0f}  {r['read_paths']['x']}, {r['workers']} threads")
    for name, r in layouts.items():
        if r["refused"]:
            print(f"  {name}: ratio refused: {r['refused']}")
    short = {n: r for n, r in layouts.items() if not r["refused"] and r["ratio_to_h5py"] < GOAL}
    if short:
        print(f"\nwhere mpidl's reader spent its last pass (s), layouts below {GOAL}x h5py:")
        for name, r in short.items():
            sp = r["spent_last_pass_s"]
            print(f"  {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in sp.items()))
        print("  (window_wait: the reader waits for the pool to read or decode a window; assembly_wait: for a "
              "batch's rows to be\n   gathered or read into its slot; slot_wait: for the consumer to release a "
              "slot; consumer_wait: the consumer waiting for a batch)")


def gpu_part(work: Path, out_dir: Path | None) -> dict | None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        print("no CUDA device: HDF5 -> GPU batches/s not measured")
        return None
    from mpidl.data.synth import synth_images

    imgs = work / "images224.h5"
    synth_images(str(imgs), 4096, classes=100, channels=3, size=224)
    read_raw(str(imgs))
    gpu = run_worker("gpu", path=str(imgs), batch=256)
    gpu["resnet50_bf16_img_s_anchor"] = RESNET50_H100_BF16_IMG_S
    gpu["ratio_to_resnet50_demand"] = gpu["images_per_s"] / RESNET50_H100_BF16_IMG_S
    print(f"HDF5 uint8 224x224 -> {gpu['device']}: {gpu['images_per_s']:.0f} images/s "
          f"({gpu['batches_per_s']:.1f} batches of 256/s), {gpu['ratio_to_resnet50_demand']:.1f}x what "
          f"ResNet-50 bf16 consumes on an H100 ({RESNET50_H100_BF16_IMG_S} img/s)")
    return gpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000, help="rows of 12 KiB, uncompressed layouts (200k = 2.46 GB)")
    ap.add_argument("--compressed-rows", type=int, default=50_000, help="rows of the gzip and lzf layouts")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5, help="processes per layout, run in turn")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds inside each process")
    ap.add_argument("--layouts", nargs="*", default=list(LAYOUTS), help=f"any of {list(LAYOUTS)}")
    ap.add_argument("--naive-rows", type=int, default=20_000)
    ap.add_argument("--no-extras", action="store_true", help="only the layout table (no naive, exact, 2 ranks)")
    ap.add_argument("--gpu-only", action="store_true", help="only HDF5 -> CUDA batches")
    ap.add_argument("--out", default=None, help="write the JSON here instead of benchmarks/results/")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--dir", default=None, help="where the temporary datasets go (default: system temp)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--args", default="{}", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        res = WORKERS[a.worker](**json.loads(a.args))
        if res:
            print("RESULT " + json.dumps(res), flush=True)
        return
    unknown = set(a.layouts) - set(LAYOUTS)
    if unknown:
        ap.error(f"unknown layouts {sorted(unknown)}; choose from {list(LAYOUTS)}")

    from common import environment, write_result

    work = Path(tempfile.mkdtemp(prefix="mpidl-bench-data-", dir=a.dir))
    out_dir = Path(a.out) if a.out else None
    try:
        figures: dict = {"dataset": {"row_bytes": ROW_BYTES, "batch": a.batch, "repeats": a.repeats,
                                     "rounds": a.rounds, "page_cache": "warm", "goal_ratio_to_h5py": GOAL},
                         "load_average": {"start": os.getloadavg()}}  # other work on the machine skews figures
        if a.gpu_only:
            figures["gpu_images_224"] = gpu_part(work, out_dir)
            _write(figures, "data-gpu", out_dir, a.no_write, write_result, environment)
            return
        layouts = {}
        for name in a.layouts:
            compressed = "compression" in LAYOUTS[name]
            path = work / "data.h5"
            t0 = time.perf_counter()
            make_dataset(path, a.compressed_rows if compressed else a.rows, LAYOUTS[name])
            read_raw(str(path))  # into the page cache
            print(f"{name}: {describe(path)}, {path.stat().st_size / 1e9:.2f} GB written in "
                  f"{time.perf_counter() - t0:.0f} s; measuring", flush=True)
            layouts[name] = measure_layout(name, path, a, compressed)
            if not a.no_extras and name == "contiguous":
                figures["extras"] = extras(path, a)
            path.unlink()
        figures["layouts"] = layouts
        figures["load_average"]["end"] = os.getloadavg()
        print_table(layouts)
        load = figures["load_average"]
        print(f"\nload average (1, 5, 15 min) at the start {_loads(load['start'])}, at the end {_loads(load['end'])} "
              f"on {os.cpu_count()} cores")
        if "extras" in figures:
            e = figures["extras"]
            print(f"\ncontiguous: naive per-row Dataset {e['naive_gbps']:.3f} GB/s (mpidl {e['mpidl_ratio_to_naive']:.0f}x); "
                  f"exact per-row shuffle {e['exact_shuffle_gbps']:.2f} GB/s; 2 ranks {e['two_ranks_gbps']:.2f} GB/s "
                  f"aggregate; peak RSS {e['rss_full_mb']:.0f} MB at {e['gb_full']:.2f} GB, "
                  f"{e['rss_quarter_mb']:.0f} MB at {e['gb_full'] / 4:.2f} GB")
        figures["gpu_images_224"] = gpu_part(work, out_dir)
        _write(figures, "data", out_dir, a.no_write, write_result, environment)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _loads(values) -> str:
    return " ".join(f"{v:.2f}" for v in values)


def extras(path: Path, a: argparse.Namespace) -> dict:
    """On the contiguous file: the naive Dataset, exact shuffle, 2 ranks, RSS at a quarter of the data."""
    naive = run_worker("naive", path=str(path), max_rows=a.naive_rows, batch=a.batch)
    exact = run_worker("mpidl", path=str(path), batch=a.batch, shuffle="exact")
    two = [run_worker("mpidl", np_=2, path=str(path), batch=a.batch, shuffle="block") for _ in range(a.repeats)]
    full = run_worker("mpidl", path=str(path), batch=a.batch, shuffle="block")
    quarter_path = path.with_name("quarter.h5")
    make_dataset(quarter_path, a.rows // 4, {})
    quarter = run_worker("mpidl", path=str(quarter_path), batch=a.batch, shuffle="block")
    quarter_path.unlink()
    return {"naive_gbps": naive["gbps"], "naive_rows_measured": naive["rows"],
            "mpidl_ratio_to_naive": full["gbps"] / naive["gbps"],
            "exact_shuffle_gbps": exact["gbps"], "two_ranks_gbps": med([t["gbps"] for t in two]),
            "two_ranks_runs": [t["gbps"] for t in two], "two_ranks_rss_rank0_mb": max(t["peak_rss_mb"] for t in two),
            "rss_full_mb": full["peak_rss_mb"], "rss_quarter_mb": quarter["peak_rss_mb"],
            "gb_full": path.stat().st_size / 1e9}


def _write(figures: dict, name: str, out_dir: Path | None, no_write: bool, write_result, environment) -> None:
    if no_write:
        return
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{name}.json"
        path.write_text(json.dumps({**environment(), **figures}, indent=2) + "\n")
        print(f"wrote {path}")
    else:
        path = write_result(name, figures)
        print(f"wrote {path.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
