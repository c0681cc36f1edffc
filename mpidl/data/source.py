"""HDF5 sources: one file, a list, or a glob, seen as one table of aligned datasets.

`H5Source` checks everything before training (`validate`, cheap: metadata only) and reads
global row ranges with `read_direct` into caller-owned buffers. Files are opened by the
reader that uses them (`open()`), never inherited across fork.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from mpidl.errors import BadInput

Files = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]

# Read-only sharded access needs no HDF5 file locks, and they fail on some parallel file systems.
os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")


def expand_files(files: Files) -> list[str]:
    """Paths in the order given; a string with glob characters expands to its sorted matches."""
    items = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    if not items:
        raise BadInput("no data files given")
    out: list[str] = []
    for item in items:
        s = os.fspath(item)
        if any(c in s for c in "*?["):
            matches = sorted(glob.glob(s))
            if not matches:
                raise BadInput(f"{s}: no file matches this pattern")
            out.extend(matches)
        else:
            out.append(s)
    return out


@dataclass(frozen=True)
class FileLayout:
    path: str
    rows: int
    chunk_rows: Optional[int]  # rows per chunk of the first key, None when contiguous
    compression: Optional[str]


class H5Source:
    """Aligned datasets `keys` over one or many HDF5 files of the same layout.

    rows=(start, stop) restricts the source to a global row range (e.g. a held-out split).
    """

    def __init__(self, files: Files, keys: Sequence[str] = ("x", "y"),
                 rows: Optional[tuple[int, int]] = None):
        if isinstance(keys, str):
            keys = (keys,)
        if not keys:
            raise BadInput("no dataset keys given")
        self.keys: tuple[str, ...] = tuple(keys)
        self.files: list[str] = expand_files(files)
        self.row_range = rows
        self._layouts: Optional[list[FileLayout]] = None
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, np.dtype] = {}

    # ------------------------------------------------------------------ validation
    def validate(self) -> "H5Source":
        """Check files, datasets, dtypes, lengths and shapes; BadInput names file, key, values.

        Metadata only, and done once per source object.
        """
        import h5py

        if self._layouts is not None:
            return self
        layouts = []
        for path in self.files:
            if not os.path.exists(path):
                raise BadInput(f"{path}: file not found")
            try:
                f = h5py.File(path, "r", locking=False)
            except OSError as e:
                reason = str(e).split("(")[0].strip().rstrip(",") or "unreadable"
                if "truncated" in str(e):
                    reason = "truncated file"
                raise BadInput(f"{path}: cannot open as HDF5 ({reason})") from None
            with f:
                rows = None
                for key in self.keys:
                    if key not in f:
                        have = ", ".join(sorted(k for k in f.keys() if isinstance(f[k], h5py.Dataset))) or "none"
                        raise BadInput(f"{path}: dataset '{key}' not found (datasets: {have})")
                    d = f[key]
                    if not isinstance(d, h5py.Dataset):
                        raise BadInput(f"{path}: '{key}' is a group, not a dataset")
                    if d.dtype.kind not in "biuf" or d.dtype.fields is not None:
                        raise BadInput(f"{path}: dataset '{key}' has non-numeric dtype {d.dtype}")
                    if d.ndim == 0:
                        raise BadInput(f"{path}: dataset '{key}' is a scalar, not rows")
                    if rows is None:
                        rows = d.shape[0]
                    elif d.shape[0] != rows:
                        raise BadInput(f"{path}: datasets have different lengths: "
                                       f"'{self.keys[0]}' has {rows} rows, '{key}' has {d.shape[0]}")
                    trailing, dtype = tuple(d.shape[1:]), d.dtype
                    if key in self._shapes and self._shapes[key] != trailing:
                        raise BadInput(f"{path}: dataset '{key}' rows have shape {trailing}, "
                                       f"but {self.files[0]} has {self._shapes[key]}")
                    if key in self._dtypes and self._dtypes[key] != dtype:
                        raise BadInput(f"{path}: dataset '{key}' has dtype {dtype}, "
                                       f"but {self.files[0]} has {self._dtypes[key]}")
                    self._shapes[key], self._dtypes[key] = trailing, dtype
                    try:  # a truncated file may open; its data must still be reachable
                        if d.shape[0]:
                            d[d.shape[0] - 1]
                    except (OSError, RuntimeError) as e:
                        raise BadInput(f"{path}: dataset '{key}' cannot be read ({str(e).splitlines()[0]})") from None
                first = f[self.keys[0]]
                layouts.append(FileLayout(path, int(rows), first.chunks[0] if first.chunks else None,
                                          first.compression))
        total = sum(lay.rows for lay in layouts)
        if total == 0:
            raise BadInput(f"{self.files[0]}: zero rows in dataset '{self.keys[0]}'"
                           + (f" across {len(self.files)} files" if len(self.files) > 1 else ""))
        if self.row_range is not None:
            a, b = self.row_range
            if not 0 <= a < b <= total:
                raise BadInput(f"{self.files[0]}: row range [{a}, {b}) outside the {total} rows")
        self._layouts = layouts
        return self

    def _need(self) -> list[FileLayout]:
        if self._layouts is None:
            self.validate()
        assert self._layouts is not None
        return self._layouts

    # ------------------------------------------------------------------ shape
    def __len__(self) -> int:
        if self.row_range is not None:
            self._need()
            return self.row_range[1] - self.row_range[0]
        return sum(lay.rows for lay in self._need())

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        self._need()
        return dict(self._shapes)

    @property
    def dtypes(self) -> dict[str, np.dtype]:
        self._need()
        return dict(self._dtypes)

    @property
    def layouts(self) -> list[FileLayout]:
        return list(self._need())

    @property
    def row_bytes(self) -> int:
        """Bytes of one row across all keys."""
        return sum(int(np.prod(s, dtype=np.int64)) * self._dtypes[k].itemsize for k, s in self.shapes.items())

    def row_bytes_of(self, key: str) -> int:
        return int(np.prod(self.shapes[key], dtype=np.int64)) * self._dtypes[key].itemsize

    def suggested_block(self, target_bytes: int = 8 << 20) -> int:
        """Rows per read: about `target_bytes`, a whole number of chunks when chunked."""
        rows = max(1, target_bytes // max(1, self.row_bytes))
        chunk = max((lay.chunk_rows or 1) for lay in self._need())
        return max(chunk, rows // chunk * chunk)

    def signature(self) -> str:
        """Identifies the bytes behind this source (paths, sizes, mtimes, keys, range)."""
        import hashlib

        h = hashlib.sha256()
        for lay in self._need():
            st = os.stat(lay.path)
            h.update(f"{Path(lay.path).resolve()}|{st.st_size}|{st.st_mtime_ns}|".encode())
        h.update(f"{self.keys}|{self.row_range}".encode())
        return h.hexdigest()[:16]

    def open(self) -> "Reader":
        return Reader(self)


class Reader:
    """Open file handles of one source, for one thread or process. Use as a context manager.

    Contiguous, uncompressed datasets are read as plain bytes at their offset in the file
    (`pread` into the caller's buffer, no HDF5 call per read, the GIL released); chunked or
    compressed ones go through h5py's `read_direct`.
    """

    def __init__(self, source: H5Source):
        import h5py

        self.source = source
        layouts = source._need()
        # A chunk cache that holds a read's worth of chunks avoids re-decompressing when a
        # block boundary splits a chunk.
        self._files = [h5py.File(lay.path, "r", locking=False, rdcc_nbytes=64 << 20, rdcc_nslots=10007)
                       for lay in layouts]
        self._dsets = [{k: f[k] for k in source.keys} for f in self._files]
        self._fds: list[Optional[int]] = []
        self._offsets: list[dict[str, Optional[int]]] = []
        for lay, dsets in zip(layouts, self._dsets):
            offs = {k: _byte_offset(d) for k, d in dsets.items()}
            self._offsets.append(offs)
            self._fds.append(os.open(lay.path, os.O_RDONLY) if any(o is not None for o in offs.values()) else None)
        self._row_bytes = {k: int(np.prod(source.shapes[k], dtype=np.int64)) * source.dtypes[k].itemsize
                           for k in source.keys}
        self._starts = np.cumsum([0] + [lay.rows for lay in layouts])
        self._base = source.row_range[0] if source.row_range else 0

    def read(self, key: str, start: int, stop: int, out: np.ndarray) -> None:
        """Rows [start, stop) of the source (its own numbering) into out[0:stop-start]."""
        a, b = start + self._base, stop + self._base
        pos = 0
        i = int(np.searchsorted(self._starts, a, side="right")) - 1
        while a < b:
            file_stop = int(self._starts[i + 1])
            n = min(b, file_stop) - a
            local = a - int(self._starts[i])
            offset = self._offsets[i][key]
            if offset is not None and out.flags.c_contiguous:
                rb = self._row_bytes[key]
                view = memoryview(out[pos:pos + n]).cast("B")
                got = os.preadv(self._fds[i], [view], offset + local * rb)
                if got != n * rb:
                    raise OSError(f"{self.source.files[i]}: short read of '{key}' rows {local}..{local + n} "
                                  f"({got} of {n * rb} bytes): the file is truncated")
            else:
                self._dsets[i][key].read_direct(out, np.s_[local:local + n], np.s_[pos:pos + n])
            pos += n
            a += n
            i += 1

    def byte_addressable(self, key: str) -> bool:
        """True when every file holds `key` contiguously, so rows can be read as bytes."""
        return all(offs[key] is not None for offs in self._offsets)

    def read_rows(self, key: str, rows: np.ndarray, out: np.ndarray) -> None:
        """Source rows `rows` (any order) into out[0:len(rows)], one read per consecutive run.

        For byte-addressable keys (see above); the caller groups rows so runs are long.
        """
        rows = rows + self._base
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        starts = np.concatenate(([0], breaks))
        lengths = np.diff(np.concatenate((starts, [rows.size])))
        first = rows[starts]
        files = np.searchsorted(self._starts, first, side="right") - 1
        rb = self._row_bytes[key]
        flat = memoryview(out.reshape(out.shape[0], -1)).cast("B")
        for dst, src, n, i in zip(starts.tolist(), first.tolist(), lengths.tolist(), files.tolist()):
            local = src - int(self._starts[i])
            if src + n > self._starts[i + 1]:  # a run across a file boundary: the general path
                self.read(key, src - self._base, src - self._base + n, out[dst:dst + n])
                continue
            got = os.preadv(self._fds[i], [flat[dst * rb:(dst + n) * rb]], self._offsets[i][key] + local * rb)
            if got != n * rb:
                raise OSError(f"{self.source.files[i]}: short read of '{key}' at row {local} "
                              f"({got} of {n * rb} bytes): the file is truncated")

    def close(self) -> None:
        for f in self._files:
            f.close()
        for fd in self._fds:
            if fd is not None:
                os.close(fd)
        self._files, self._fds = [], []

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _byte_offset(d) -> Optional[int]:
    """The file offset of a contiguous, unfiltered, native-order dataset; else None."""
    if d.chunks is not None or d.compression is not None or d.dtype.byteorder not in ("=", "|", "<"):
        return None
    if d.dtype.byteorder == "<" and np.little_endian is False:
        return None
    try:
        return d.id.get_offset()
    except Exception:  # external storage or not yet allocated
        return None
