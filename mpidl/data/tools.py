"""`mpidl data convert` and `mpidl data inspect`: arrays into well-chunked HDF5, and what a
file's layout means for sharded reading."""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from mpidl.errors import BadInput

CHUNK_TARGET = 4 << 20  # ~4 MiB chunks: large enough for block reads, small enough to shard
COPY_BYTES = 64 << 20   # convert copies rows in blocks of about this many bytes
DEFAULT_PAIR = ("x", "y")  # two .npy files without --keys: features and targets, as training reads them


def chunk_rows_for(row_bytes: int, target: int = CHUNK_TARGET) -> int:
    return int(max(1, min(65536, target // max(1, row_bytes))))


class _NpzArray:
    """One array of an .npz, read row block after row block in order without holding it
    whole: np.load ignores mmap_mode for .npz and inflates a member at first access. A zip
    member is a stream, so its rows are read through numpy's .npy header, in order."""

    def __init__(self, path: str, member: str):
        self.path, self.key = path, member[:-4] if member.endswith(".npy") else member
        self._zip = zipfile.ZipFile(path)
        self._fp = self._zip.open(member)
        version = np.lib.format.read_magic(self._fp)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"array '{self.key}' has .npy format version {version}")
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        self.shape, fortran, self.dtype = read(self._fp)
        self.ndim, self._next = len(self.shape), 0
        self._whole: Optional[np.ndarray] = None
        if fortran:  # column-major: no row is a run of bytes, so it is read whole (as np.load would)
            self._whole = self._read(int(np.prod(self.shape, dtype=np.int64))).reshape(self.shape, order="F")

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.shape[0])
        if self._whole is not None:
            return self._whole[start:stop]
        assert start == self._next, "rows are read in order"
        n = stop - start
        block = self._read(n * int(np.prod(self.shape[1:], dtype=np.int64))).reshape(n, *self.shape[1:])
        self._next = stop
        return block

    def _read(self, count: int) -> np.ndarray:
        want = count * self.dtype.itemsize
        data = self._fp.read(want)
        if len(data) != want:
            raise BadInput(f"{self.path}: array '{self.key}' ends before its {self.shape[0]} rows (a truncated .npz)")
        return np.frombuffer(data, self.dtype, count)

    def close(self) -> None:
        self._fp.close()
        self._zip.close()


def convert(inputs: Sequence[str], out: str, keys: Optional[Sequence[str]] = None,
            compression: Optional[str] = None, chunk_rows: Optional[int] = None) -> dict[str, tuple]:
    """Write .npy files (one key each) or one .npz (its arrays) into `out` atomically.

    Keys: `keys` in order, one per .npy file; without them, two .npy files are x and y (the
    features and the targets, as job specs and `mpidl data check` read them by default), any
    other number of files each the file's name (an .npz: its own array names).

    Arrays are copied in row blocks: .npy files through memory maps, .npz members read in
    order from the zip (Fortran-ordered members are read whole), so files larger than memory
    work. Nothing is left at `out` (or beside it) when a conversion fails.
    """
    arrays: dict[str, Union[np.ndarray, _NpzArray]] = {}
    if not keys and len(inputs) == 2 and not any(p.endswith(".npz") for p in inputs):
        keys = DEFAULT_PAIR
    try:
        for i, path in enumerate(inputs):
            if not os.path.exists(path):
                raise BadInput(f"{path}: file not found")
            try:
                if path.endswith(".npz"):
                    with zipfile.ZipFile(path) as z:
                        members = [m for m in z.namelist() if m.endswith(".npy")]
                    for m in members:
                        if not keys or m[:-4] in keys:
                            arrays[m[:-4]] = _NpzArray(path, m)
                else:
                    key = keys[i] if keys and i < len(keys) else Path(path).stem
                    arrays[key] = np.load(path, mmap_mode="r")
            except (ValueError, OSError, zipfile.BadZipFile) as e:
                raise BadInput(f"{path}: not a readable .npy/.npz array ({str(e).splitlines()[0]})") from None
        return _write(inputs, arrays, out, keys, compression, chunk_rows)
    finally:
        for a in arrays.values():
            if isinstance(a, _NpzArray):
                a.close()


def _write(inputs: Sequence[str], arrays: dict, out: str, keys: Optional[Sequence[str]],
           compression: Optional[str], chunk_rows: Optional[int]) -> dict[str, tuple]:
    import h5py

    if keys and any(p.endswith(".npz") for p in inputs):
        missing = [k for k in keys if k not in arrays]
        if missing:
            raise BadInput(f"{inputs[0]}: arrays {missing} not found (have: {sorted(arrays)})")
        arrays = {k: arrays[k] for k in keys}
    if not arrays:
        raise BadInput("convert: no arrays found in the inputs")
    lengths = {k: a.shape[0] if a.ndim else 0 for k, a in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise BadInput(f"{inputs[0]}: arrays have different lengths: {lengths}")
    for k, a in arrays.items():
        if a.dtype.kind not in "biuf":
            raise BadInput(f"{inputs[0]}: array '{k}' has non-numeric dtype {a.dtype}")
    rows = next(iter(lengths.values()))
    Path(out).resolve().parent.mkdir(parents=True, exist_ok=True)
    tmp = str(Path(out).with_name(f".{Path(out).name}.{os.getpid()}.partial"))
    try:
        with h5py.File(tmp, "w") as f:
            for k, a in arrays.items():
                row_bytes = int(np.prod(a.shape[1:], dtype=np.int64)) * a.dtype.itemsize
                cr = min(rows, chunk_rows or chunk_rows_for(row_bytes)) or 1
                d = f.create_dataset(k, a.shape, a.dtype, chunks=(cr, *a.shape[1:]), compression=compression)
                step = max(cr, COPY_BYTES // max(1, row_bytes) // cr * cr)
                for s in range(0, rows, step):
                    d[s:s + step] = np.asarray(a[s:s + step])
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)  # a failed conversion leaves nothing half-written
    return {k: (a.shape, str(a.dtype)) for k, a in arrays.items()}


def inspect(path: str) -> str:
    """A report on every dataset of `path`, with advice for sharded reading."""
    import h5py

    if not os.path.exists(path):
        raise BadInput(f"{path}: file not found")
    try:
        f = h5py.File(path, "r", locking=False)
    except OSError as e:
        raise BadInput(f"{path}: cannot open as HDF5 ({str(e).splitlines()[0]})") from None
    lines = [f"{path}  ({os.path.getsize(path) / 1e6:.1f} MB on disk)"]
    advice: list[str] = []
    with f:
        items: list[tuple[str, h5py.Dataset]] = []
        f.visititems(lambda name, obj: items.append((name, obj)) if isinstance(obj, h5py.Dataset) else None)
        rows = {d.shape[0] for _, d in items if d.ndim}
        for name, d in items:
            row_bytes = int(np.prod(d.shape[1:], dtype=np.int64)) * d.dtype.itemsize
            if d.chunks:
                chunk_bytes = int(np.prod(d.chunks, dtype=np.int64)) * d.dtype.itemsize
                layout = f"chunked {d.chunks} ({chunk_bytes / 1024:.0f} KiB/chunk)"
            else:
                layout = "contiguous"
            comp = d.compression + (f"({d.compression_opts})" if d.compression_opts is not None else "") \
                if d.compression else "none"
            lines.append(f"  {name}: shape {d.shape} {d.dtype}, {d.nbytes / 1e6:.1f} MB, {layout}, "
                         f"compression {comp}, {row_bytes} B/row")
            if d.chunks and d.ndim and d.chunks[1:] != d.shape[1:]:
                advice.append(f"'{name}' chunks split rows {d.chunks}: a row read touches several chunks; "
                              f"rechunk as (N, {', '.join(map(str, d.shape[1:]))})")
            if d.chunks and d.ndim:
                cb = int(np.prod(d.chunks, dtype=np.int64)) * d.dtype.itemsize
                if cb < 256 << 10:
                    advice.append(f"'{name}' chunks are small ({cb / 1024:.0f} KiB): reads pay per-chunk overhead; "
                                  f"aim for 1-8 MiB (about {chunk_rows_for(row_bytes)} rows)")
                if cb > 64 << 20:
                    advice.append(f"'{name}' chunks are large ({cb / 2**20:.0f} MiB): each rank decompresses whole "
                                  "chunks; the default 1 MiB chunk cache cannot hold one")
            if d.compression:
                advice.append(f"'{name}' is {d.compression}-compressed: reads cost CPU per byte "
                              "(see benchmarks/bench_data.py for the measured cost)")
            if d.dtype.kind not in "biuf":
                advice.append(f"'{name}' has non-numeric dtype {d.dtype}: mpidl cannot load it")
        if len(rows) > 1:
            advice.append(f"datasets have different lengths {sorted(rows)}: only aligned datasets can be loaded "
                          "together")
    if not advice:
        advice.append("layout is good for sharded block reads")
    return "\n".join(lines + ["advice:"] + [f"  - {a}" for a in advice])
