"""HDF5 sources as metadata: one file, a list, or a glob, seen as one table of aligned datasets.

`H5Source` names the files and keys and checks everything before training (`validate`, cheap:
metadata only): datasets, dtypes, lengths, shapes, and each file's layout (`FileLayout`: chunking,
compression, which keys are plain bytes at known offsets). It reads nothing itself: `open()` gives
a `mpidl.data.source.Reader`, which opens the files in the thread that uses it (never inherited
across fork) and reads global row ranges into caller-owned buffers.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence, Union

import numpy as np

from mpidl.data.chunks import cuts_last_axis_only, native
from mpidl.errors import BadInput

if TYPE_CHECKING:
    from mpidl.data.source import Reader

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
    chunk_rows: Optional[int]  # rows per chunk of the key with the largest chunks; None: all contiguous
    compression: Optional[str]  # that key's compression
    addressable: frozenset[str] = frozenset()  # keys whose rows are runs of bytes at known offsets
    columns: frozenset[str] = frozenset()  # keys in chunks that cut only the rows' last axis


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
                assert rows is not None  # keys is never empty
                layouts.append(_layout_of(path, int(rows), {k: f[k] for k in self.keys}))
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

    def row_addressable(self, key: str) -> bool:
        """True when every file stores `key`'s rows as plain bytes (contiguous or whole-row
        unfiltered chunks), so they can be read straight into a batch (metadata only)."""
        return all(key in lay.addressable for lay in self._need())

    def column_chunked(self, key: str) -> bool:
        """True when every file stores `key` in chunks that cut only the rows' last axis, into
        equal parts (h5py's auto chunks of wide rows): each row is gathered from several chunks
        lying side by side (metadata only; Reader.column_chunks also needs the chunk index)."""
        return all(key in lay.columns for lay in self._need())

    def open(self, workers: int = 1) -> "Reader":
        """File handles for one thread, decoding chunks on `workers` threads."""
        from mpidl.data.source import Reader

        return Reader(self, workers)


def _layout_of(path: str, rows: int, dsets: dict) -> FileLayout:
    """What sharded reading needs to know of one file's datasets (metadata only)."""
    biggest = max(dsets.values(),
                  key=lambda d: int(np.prod(d.chunks, dtype=np.int64)) * d.dtype.itemsize if d.chunks else 0)
    addressable = frozenset(
        k for k, d in dsets.items()
        if native(d.dtype) and d.id.get_create_plist().get_nfilters() == 0
        and (d.chunks is None or tuple(d.chunks[1:]) == tuple(d.shape[1:])))
    columns = frozenset(  # as Reader.column_chunks reads them, a row spanning several chunks side by side
        k for k, d in dsets.items()
        if d.chunks is not None and cuts_last_axis_only(d.chunks, d.shape) and d.chunks[-1] < d.shape[-1])
    return FileLayout(path, rows, biggest.chunks[0] if biggest.chunks else None, biggest.compression, addressable,
                      columns)
