"""Learnable synthetic datasets in HDF5, written in parallel across ranks.

Rows are generated in fixed blocks, each from its own seeded generator, so the file's bytes
depend on (seed, shape) only — never on how many ranks wrote it. Contiguous files are
allocated by rank 0 and every rank writes its blocks' bytes straight to their offsets;
chunked or compressed files are written by the ranks in turn (generation stays parallel).
The file appears whole or not at all: it is written under a temporary name of its own and
renamed into place, while rank 0 holds `<file>.lock`, so two jobs writing it take turns.

images:  N×C×H×W uint8, class-dependent patterns plus noise; y int64 class labels.
tabular: N×F float32 features; y = a known rule of them (linear or nonlinear), as int64
         classes when `classes` is given, else float32 targets of shape N×1. The rule's
         coefficients are stored with `y` (attributes true_coef F×outputs, true_intercept,
         rule, noise; `read_truth`), so a regression can be checked against them.
"""
from __future__ import annotations

import glob
import os
import secrets
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from mpidl.errors import BadInput

GEN_BLOCK = 4096  # rows per independently seeded generation block


def _image_block(seed: int, index: int, rows: int, classes: int, channels: int, size: int,
                 noise: float) -> tuple[np.ndarray, np.ndarray]:
    templates = np.random.default_rng([seed, 0xC1A55]).uniform(0, 255, (classes, channels, size, size))
    rng = np.random.default_rng([seed, index])
    y = rng.integers(0, classes, rows)
    x = templates[y] + rng.normal(0, noise, (rows, channels, size, size))
    return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)


def _tabular_rule(seed: int, features: int, outputs: int) -> tuple[np.ndarray, np.ndarray]:
    """The coefficients (F×outputs) and intercepts of the tabular rule."""
    w_rng = np.random.default_rng([seed, 0x7AB])
    w = w_rng.normal(0, 1 / np.sqrt(features), (features, outputs))
    return w, w_rng.normal(0, 0.1, outputs)


def _tabular_block(seed: int, index: int, rows: int, features: int, rule: str, classes: Optional[int],
                   noise: float) -> tuple[np.ndarray, np.ndarray]:
    w, b = _tabular_rule(seed, features, classes or 1)
    rng = np.random.default_rng([seed, index])
    x = rng.normal(0, 1, (rows, features)).astype(np.float32)
    z = x.astype(np.float64) @ w + b
    if rule == "nonlinear":
        z = np.sin(2 * z) + 0.5 * z ** 2
    z = z + rng.normal(0, noise, z.shape)
    if classes:
        return x, z.argmax(axis=1).astype(np.int64)
    return x, z.astype(np.float32)


def _lock(target: Path) -> Optional[int]:
    """Hold `<file>.lock` (flock): another job writing the same file finishes first. None where
    the file system has no flock: the unique temporary name alone keeps the file whole."""
    import fcntl

    fd = os.open(target.with_name(target.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        os.close(fd)
        return None
    return fd


def _write(path: str, rows: int, specs: dict[str, tuple[tuple[int, ...], np.dtype]],
           make: Callable[[int, int], tuple[np.ndarray, ...]], world, chunk_rows: Optional[int],
           compression: Optional[str], attrs: Optional[dict[str, dict]] = None, if_missing: bool = False) -> bool:
    """Write the file through a temporary one of a name of its own, renamed into place at the
    end (atomic), while rank 0 holds `<file>.lock`: two jobs generating the same file take
    turns, and with `if_missing` the second finds it written and writes nothing (False)."""
    import h5py

    rank, size = (world.rank, world.size) if world is not None else (0, 1)
    comm = world.comm if world is not None and world.size > 1 else None
    target = Path(path)
    keys = list(specs)
    contiguous = chunk_rows is None and compression is None
    lock, tmp, offsets, skip = None, None, None, False
    try:
        if rank == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            lock = _lock(target)
            skip = if_missing and target.exists()
            if lock is not None:  # under the lock, no other writer is alive: their leftovers go
                for old in target.parent.glob(f".{glob.escape(target.name)}.*.partial"):
                    old.unlink(missing_ok=True)
            if not skip:
                tmp = str(target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.partial"))
                # Attributes (a rule's coefficients) may pass 64 KiB: that needs the format of HDF5 1.8 on.
                with h5py.File(tmp, "w", libver=("v108", "latest") if attrs else None) as f:
                    for k, (shape, dtype) in specs.items():
                        if contiguous:
                            # Early allocation gives every dataset its final byte offset now.
                            space = h5py.h5s.create_simple((rows, *shape))
                            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
                            dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
                            h5py.h5d.create(f.id, k.encode(), h5py.h5t.py_create(np.dtype(dtype)), space, dcpl=dcpl)
                        else:
                            chunks = (min(chunk_rows or 1024, rows), *shape)
                            f.create_dataset(k, (rows, *shape), dtype, chunks=chunks, compression=compression)
                    for k, values in (attrs or {}).items():
                        f[k].attrs.update(values)
                    if contiguous:
                        offsets = {k: f[k].id.get_offset() for k in keys}
        if comm is not None:
            skip, tmp, offsets = comm.bcast((skip, tmp, offsets), root=0)
        if skip:
            return False
        assert tmp is not None  # named by rank 0, which sent it to the others
        _fill(tmp, rows, specs, make, rank, size, comm, offsets)
        if rank == 0:
            os.replace(tmp, path)
    finally:
        if rank == 0:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)  # a write that failed leaves nothing half-written behind
            if lock is not None:
                os.close(lock)  # releases the flock
    if comm is not None:
        comm.Barrier()
    return True


def _fill(tmp: str, rows: int, specs: dict[str, tuple[tuple[int, ...], np.dtype]],
          make: Callable[[int, int], tuple[np.ndarray, ...]], rank: int, size: int, comm,
          offsets: Optional[dict[str, int]]) -> None:
    """Every rank writes its generation blocks into `tmp`; all have written on return."""
    import h5py

    keys = list(specs)
    blocks = range(-(-rows // GEN_BLOCK))
    mine = [i for i in blocks if i % size == rank]
    if offsets is not None:  # contiguous: each rank writes its bytes at their offsets
        row_bytes = {k: int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize for k, (s, d) in specs.items()}
        fd = os.open(tmp, os.O_WRONLY)
        try:
            for i in mine:
                arrays = make(i, min(GEN_BLOCK, rows - i * GEN_BLOCK))
                for k, arr in zip(keys, arrays):
                    os.pwrite(fd, np.ascontiguousarray(arr).tobytes(), offsets[k] + i * GEN_BLOCK * row_bytes[k])
            os.fsync(fd)
        finally:
            os.close(fd)
    else:
        generated = [(i, make(i, min(GEN_BLOCK, rows - i * GEN_BLOCK))) for i in mine]
        for turn in range(size):  # one writer at a time: HDF5 without MPI-IO is not parallel
            if turn == rank:
                with h5py.File(tmp, "r+") as f:
                    for i, arrays in generated:
                        for k, arr in zip(keys, arrays):
                            f[k][i * GEN_BLOCK:i * GEN_BLOCK + len(arr)] = arr
            if comm is not None:
                comm.Barrier()
    if comm is not None:
        comm.Barrier()


def synth_images(path: str, rows: int, classes: int = 10, channels: int = 3, size: int = 16,
                 noise: float = 60.0, seed: int = 0, chunk_rows: Optional[int] = None,
                 compression: Optional[str] = None, world=None, if_missing: bool = False) -> bool:
    """N×C×H×W uint8 images `x` and int64 labels `y`. if_missing: write nothing (False) when
    the file is there once no other job writes it."""
    if rows < 1 or classes < 2 or channels < 1 or size < 1:
        raise BadInput(f"synth images: need rows >= 1, classes >= 2, channels >= 1, size >= 1 "
                       f"(got rows={rows}, classes={classes}, channels={channels}, size={size})")
    return _write(path, rows, {"x": ((channels, size, size), np.dtype(np.uint8)), "y": ((), np.dtype(np.int64))},
                  lambda i, n: _image_block(seed, i, n, classes, channels, size, noise), world, chunk_rows,
                  compression, if_missing=if_missing)


def synth_tabular(path: str, rows: int, features: int = 16, rule: str = "linear", classes: Optional[int] = None,
                  noise: float = 0.05, seed: int = 0, chunk_rows: Optional[int] = None,
                  compression: Optional[str] = None, world=None, if_missing: bool = False) -> bool:
    """N×F float32 features `x` and targets `y` from a known rule (if_missing: as synth_images)."""
    if rule not in ("linear", "nonlinear"):
        raise BadInput(f"synth tabular: rule must be 'linear' or 'nonlinear', got {rule!r}")
    if rows < 1 or features < 1 or (classes is not None and classes < 2):
        raise BadInput(f"synth tabular: need rows >= 1, features >= 1, classes >= 2 "
                       f"(got rows={rows}, features={features}, classes={classes})")
    y_spec = ((), np.dtype(np.int64)) if classes else ((1,), np.dtype(np.float32))
    w, b = _tabular_rule(seed, features, classes or 1)
    truth = {"true_coef": w, "true_intercept": b, "rule": rule, "noise": float(noise)}
    return _write(path, rows, {"x": ((features,), np.dtype(np.float32)), "y": y_spec},
                  lambda i, n: _tabular_block(seed, i, n, features, rule, classes, noise), world, chunk_rows,
                  compression, attrs={"y": truth}, if_missing=if_missing)


def read_truth(path: str, key: str = "y") -> Optional[dict]:
    """The rule a synthetic tabular file was generated from (coef F×outputs, intercept, rule,
    noise), or None for a file without one."""
    import h5py

    with h5py.File(path, "r", locking=False) as f:
        if key not in f or "true_coef" not in f[key].attrs:
            return None
        a = f[key].attrs
        return {"coef": np.asarray(a["true_coef"], np.float64),
                "intercept": np.asarray(a["true_intercept"], np.float64),
                "rule": str(a["rule"]), "noise": float(a["noise"])}
