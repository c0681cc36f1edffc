"""HDF5 → batches: raw block reads vs the naive per-row Dataset vs mpidl, one run, same bytes.

    .venv/bin/python benchmarks/bench_data.py [--rows 200000] [--repeats 3] [--dir /tmp]

Measures, on a warm page cache and a ≥ 2 GB contiguous float32 dataset (CIFAR-sized rows):
  raw     the file's bytes read in 64 MiB blocks into one reused buffer (the limit)
  naive   torch Dataset whose __getitem__ reads one row with h5py, DataLoader(shuffle=True)
  mpidl   ShardedLoader, per-epoch block shuffle, 1 rank (and exact per-row shuffle: its cost)
  mpidl2  the same under `mpirun -np 2`, aggregate bytes over the slowest rank's time
  gzip/lzf  mpidl on compressed copies of a slice, against mpidl on the same slice uncompressed
Each measurement runs in its own process, so peak RSS is that path's own. Peak RSS is
taken at two dataset sizes to show it does not grow with the data.
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
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

FEATURES = 3 * 32 * 32  # CIFAR-sized float32 rows: 12 KiB each
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_rmaps_base_oversubscribe": "1", "OMPI_MCA_btl_vader_single_copy_mechanism": "none"}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- workers (one process each)
def work_raw(path: str, **_) -> dict:
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    t0 = time.perf_counter()
    total = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(view)
            if not n:
                break
            total += n
    return {"bytes": total, "seconds": time.perf_counter() - t0}


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
    return {"bytes": rows * (FEATURES * 4 + 8), "seconds": time.perf_counter() - t0, "rows": rows}


def work_mpidl(path: str, batch: int, shuffle: str, keys: str = "x,y", **_) -> dict:
    import mpidl
    from mpidl.data import H5Source, ShardedLoader

    world = mpidl.init()
    src = H5Source(path, keys=keys.split(","))
    loader = ShardedLoader(src, world, batch_size=batch, seed=0, shuffle=shuffle, prefetch=4)
    loader.set_epoch(1)
    world.barrier()
    t0 = time.perf_counter()
    rows = 0
    for x, y in loader:
        rows += x.shape[0]
    seconds = time.perf_counter() - t0
    out = {"bytes": rows * src.row_bytes, "seconds": seconds, "rows": rows}
    gathered = world.comm.gather(out, root=0)
    if world.rank == 0 and world.size > 1:
        out = {"bytes": sum(g["bytes"] for g in gathered), "seconds": max(g["seconds"] for g in gathered),
               "rows": sum(g["rows"] for g in gathered), "ranks": world.size}
    out["peak_rss_mb"] = peak_rss_mb()
    return out if world.rank == 0 else {}


def work_gpu(path: str, batch: int, **_) -> dict:
    """HDF5 uint8 224×224 images -> CUDA float batches (scaled on the device), images/s."""
    import torch

    import mpidl
    from mpidl.data import H5Source, ShardedLoader
    from mpidl.data.preprocess import Pipeline

    world = mpidl.init()
    loader = ShardedLoader(H5Source(path), world, batch_size=batch, prefetch=4, device="cuda",
                           transform=Pipeline(scale_uint8=True, flip=True))
    for epoch in range(2):  # the first pass warms CUDA and the page cache
        loader.set_epoch(epoch)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        n = 0
        for x, _ in loader:
            n += x.shape[0]
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    return {"images_per_s": n / seconds, "batches_per_s": n / batch / seconds, "device": torch.cuda.get_device_name(0)}


WORKERS = {"raw": work_raw, "naive": work_naive, "mpidl": work_mpidl, "gpu": work_gpu}
RESNET50_H100_BF16_IMG_S = 3981  # plain PyTorch, batch 256, bf16 autocast (shared anchors)


def run_worker(mode: str, np_: int = 1, **kw) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--args", json.dumps(kw)]
    if np_ > 1:
        cmd = ["mpirun", "-np", str(np_), *cmd]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **MPI_ENV}, timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{p.stderr[-3000:]}")
    line = next(line for line in p.stdout.splitlines() if line.startswith("RESULT "))
    res = json.loads(line[7:])
    res.setdefault("peak_rss_mb", None)
    return res


# ---------------------------------------------------------------- the run
def make_dataset(path: Path, rows: int, chunked: bool = False, compression: str | None = None,
                 source: Path | None = None) -> None:
    import h5py

    block = 8192
    with h5py.File(path, "w") as f:
        kw = {"chunks": (256, FEATURES), "compression": compression} if chunked or compression else {}
        x = f.create_dataset("x", (rows, FEATURES), np.float32, **kw)
        y = f.create_dataset("y", (rows,), np.int64, **({"chunks": (4096,), "compression": compression}
                                                         if chunked or compression else {}))
        rng = np.random.default_rng(0)
        src = h5py.File(source, "r") if source else None
        for s in range(0, rows, block):
            n = min(block, rows - s)
            if src is not None:
                x[s:s + n] = src["x"][s:s + n]
            else:  # smooth-ish values compress like real images do, not like noise
                base = rng.integers(0, 256, (n, 1), dtype=np.int64).astype(np.float32)
                x[s:s + n] = base + rng.integers(0, 8, (n, FEATURES)).astype(np.float32)
            y[s:s + n] = np.arange(s, s + n)
        if src is not None:
            src.close()


def gbps(r: dict) -> float:
    return r["bytes"] / r["seconds"] / 1e9


def median_run(repeats: int, mode: str, **kw) -> tuple[float, dict]:
    runs = [run_worker(mode, **kw) for _ in range(repeats)]
    rates = sorted(gbps(r) for r in runs)
    return float(np.median(rates)), max(runs, key=lambda r: r.get("peak_rss_mb") or 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000, help="rows of 12 KiB (200k = 2.46 GB)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--naive-rows", type=int, default=20_000)
    ap.add_argument("--dir", default=None, help="where the temporary dataset goes (default: system temp)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--args", default="{}", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        res = WORKERS[a.worker](**json.loads(a.args))
        if res:
            print("RESULT " + json.dumps(res), flush=True)
        return

    from common import write_result

    work = Path(tempfile.mkdtemp(prefix="mpidl-bench-data-", dir=a.dir))
    try:
        big, small = work / "big.h5", work / "small.h5"
        t0 = time.perf_counter()
        make_dataset(big, a.rows)
        make_dataset(small, a.rows // 4)
        slice_rows = min(a.rows // 4, 50_000)
        plain_slice, gz, lzf = work / "slice.h5", work / "gzip.h5", work / "lzf.h5"
        make_dataset(plain_slice, slice_rows, source=small)
        make_dataset(gz, slice_rows, compression="gzip", source=small)
        make_dataset(lzf, slice_rows, compression="lzf", source=small)
        size_gb = big.stat().st_size / 1e9
        print(f"datasets written in {time.perf_counter() - t0:.0f} s: {size_gb:.2f} GB, {a.rows} rows of "
              f"{FEATURES * 4 // 1024} KiB")
        run_worker("raw", path=str(big))  # warm the page cache
        run_worker("raw", path=str(small))

        # raw and mpidl alternate, so drift in the machine's speed hits both alike
        raw_rates, mp_rates, mp_run = [], [], {}
        for _ in range(a.repeats):
            raw_rates.append(gbps(run_worker("raw", path=str(big))))
            r = run_worker("mpidl", path=str(big), batch=a.batch, shuffle="block")
            mp_rates.append(gbps(r))
            mp_run = max(mp_run, r, key=lambda x: x.get("peak_rss_mb") or 0)
        raw, mp = float(np.median(raw_rates)), float(np.median(mp_rates))
        naive_r = run_worker("naive", path=str(big), max_rows=a.naive_rows, batch=a.batch)
        naive = gbps(naive_r)
        exact, _ = median_run(1, "mpidl", path=str(big), batch=a.batch, shuffle="exact")
        mp2, mp2_run = median_run(a.repeats, "mpidl", np_=2, path=str(big), batch=a.batch, shuffle="block")
        _, small_run = median_run(1, "mpidl", path=str(small), batch=a.batch, shuffle="block")
        plain_s, _ = median_run(a.repeats, "mpidl", path=str(plain_slice), batch=a.batch, shuffle="block")
        gz_s, _ = median_run(1, "mpidl", path=str(gz), batch=a.batch, shuffle="block")
        lzf_s, _ = median_run(1, "mpidl", path=str(lzf), batch=a.batch, shuffle="block")
        raw_s, _ = median_run(a.repeats, "raw", path=str(plain_slice))

        rows = [
            ("raw block read (limit)", raw, 1.0, raw / naive, None),
            ("naive Dataset + DataLoader(shuffle)", naive, naive / raw, 1.0, None),
            ("mpidl block shuffle, 1 rank", mp, mp / raw, mp / naive, mp_run["peak_rss_mb"]),
            ("mpidl exact per-row shuffle, 1 rank", exact, exact / raw, exact / naive, None),
            ("mpidl block shuffle, 2 ranks (aggregate)", mp2, mp2 / raw, mp2 / naive, mp2_run["peak_rss_mb"]),
        ]
        print(f"\n{'path':<44}{'GB/s':>8}{'x raw':>8}{'x naive':>9}{'peak RSS MB':>13}")
        for name, v, r_raw, r_naive, rss in rows:
            print(f"{name:<44}{v:>8.3f}{r_raw:>8.2f}{r_naive:>9.1f}{(f'{rss:.0f}' if rss else ''):>13}")
        print(f"\ncompressed slice ({slice_rows} rows): uncompressed mpidl {plain_s:.3f} GB/s (raw {raw_s:.3f}), "
              f"lzf {lzf_s:.3f} ({lzf_s / plain_s:.2f}x), gzip {gz_s:.3f} ({gz_s / plain_s:.2f}x)")
        print(f"peak RSS of mpidl: {mp_run['peak_rss_mb']:.0f} MB on {size_gb:.2f} GB, "
              f"{small_run['peak_rss_mb']:.0f} MB on {size_gb / 4:.2f} GB")

        gpu = None
        try:
            import torch

            has_cuda = torch.cuda.is_available()
        except ImportError:
            has_cuda = False
        if has_cuda:
            from mpidl.data.synth import synth_images

            imgs = work / "images224.h5"
            synth_images(str(imgs), 4096, classes=100, channels=3, size=224)
            run_worker("raw", path=str(imgs))
            gpu = run_worker("gpu", path=str(imgs), batch=256)
            gpu["resnet50_bf16_img_s_anchor"] = RESNET50_H100_BF16_IMG_S
            gpu["ratio_to_resnet50_demand"] = gpu["images_per_s"] / RESNET50_H100_BF16_IMG_S
            print(f"HDF5 uint8 224x224 -> {gpu['device']}: {gpu['images_per_s']:.0f} images/s "
                  f"({gpu['batches_per_s']:.1f} batches of 256/s), {gpu['ratio_to_resnet50_demand']:.1f}x what "
                  f"ResNet-50 bf16 consumes on an H100 ({RESNET50_H100_BF16_IMG_S} img/s)")
        else:
            print("no CUDA device: HDF5 -> GPU batches/s not measured")

        path = write_result("data", {
            "gpu_images_224": gpu,
            "dataset": {"rows": a.rows, "row_bytes": FEATURES * 4 + 8, "gb": size_gb, "layout": "contiguous float32",
                        "batch": a.batch, "repeats": a.repeats, "page_cache": "warm"},
            "raw_gbps": raw, "raw_gbps_runs": raw_rates, "mpidl_gbps_runs": mp_rates, "naive_gbps": naive, "naive_rows_measured": naive_r["rows"],
            "mpidl_gbps": mp, "mpidl_ratio_to_raw": mp / raw, "mpidl_ratio_to_naive": mp / naive,
            "mpidl_exact_shuffle_gbps": exact, "mpidl_exact_ratio_to_raw": exact / raw,
            "mpidl_2_ranks_gbps": mp2, "mpidl_2_ranks_ratio_to_raw": mp2 / raw,
            "peak_rss_mb": {"mpidl_1_rank_full": mp_run["peak_rss_mb"], "mpidl_1_rank_quarter": small_run["peak_rss_mb"],
                            "mpidl_2_ranks_rank0": mp2_run["peak_rss_mb"]},
            "compressed": {"rows": slice_rows, "uncompressed_gbps": plain_s, "raw_gbps": raw_s,
                           "lzf_gbps": lzf_s, "gzip_gbps": gz_s,
                           "lzf_ratio_to_uncompressed": lzf_s / plain_s, "gzip_ratio_to_uncompressed": gz_s / plain_s},
            "goals": {"mpidl_ratio_to_raw": 0.85, "mpidl_ratio_to_naive": 30},
        })
        print(f"wrote {path.relative_to(HERE.parent)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
