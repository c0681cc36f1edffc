"""HDF5 chunks read without HDF5: where each chunk sits in its file, and how to decode it.

HDF5 serialises every call behind one global lock, so h5py decompresses on one core however
many threads ask. A chunk's bytes sit at a fixed offset in the file, listed once per dataset
with `chunk_iter`; reading them with `pread` and decoding them with zlib (gzip) or h5py's own
compiled LZF routine (through ctypes) releases the GIL, so a pool of threads decodes chunks
on every core at once. Filters other than deflate, shuffle and LZF, unwritten chunks and
foreign byte orders are left to h5py (`ChunkIndex.of` returns None for them).

Uncompressed chunks that span whole rows are "row-addressable": row r lies at a known byte
offset, so rows can be read straight into a batch like a contiguous dataset's.
"""
from __future__ import annotations

import ctypes
import os
import threading
import zlib
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Optional

import numpy as np

from mpidl.errors import BadInput

DEFLATE, SHUFFLE, LZF = 1, 2, 32000  # HDF5 filter ids (LZF is h5py's registered filter)


def _lzf_routine() -> Optional[Callable[..., int]]:
    """h5py's compiled `lzf_decompress`, called without the GIL; None where it is not exported."""
    try:
        from h5py import h5z

        fn = ctypes.CDLL(h5z.__file__).lzf_decompress
    except (ImportError, OSError, AttributeError):
        return None
    fn.restype = ctypes.c_uint
    fn.argtypes = [ctypes.c_void_p, ctypes.c_uint, ctypes.c_void_p, ctypes.c_uint]
    return fn


_LZF = _lzf_routine()
_scratch = threading.local()  # per-thread reusable buffers: fresh ones would fault a page per 4 KiB


def scratch(slot: int, nbytes: int) -> np.ndarray:
    """This thread's reusable buffer number `slot`, at least `nbytes` long (as uint8)."""
    bufs = _scratch.__dict__.setdefault("bufs", {})
    buf = bufs.get(slot)
    if buf is None or buf.size < nbytes:
        buf = bufs[slot] = np.empty(nbytes, np.uint8)
    return buf[:nbytes]


def cuts_last_axis_only(chunks: tuple, shape: tuple) -> bool:
    """Chunks of rows shaped `shape[1:]` that keep every axis but the first and the last whole
    and cut the last into equal parts (one part: whole rows)."""
    return len(shape) >= 2 and tuple(chunks[1:-1]) == tuple(shape[1:-1]) and shape[-1] % chunks[-1] == 0


def native(dtype: np.dtype) -> bool:
    return dtype.byteorder in ("=", "|") or (dtype.byteorder == "<") == (np.little_endian is True)


@dataclass(frozen=True)
class ChunkIndex:
    """The chunks of one dataset in one file: grid, offsets, stored sizes, filter masks."""

    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype
    filters: tuple[tuple[int, tuple[int, ...]], ...]  # (id, client values), in pipeline order
    offsets: np.ndarray  # int64, shaped like the chunk grid
    sizes: np.ndarray
    masks: np.ndarray    # bit i set: filter i was skipped for that chunk

    @classmethod
    def of(cls, dset) -> Optional["ChunkIndex"]:
        """The index of a chunked h5py dataset, or None when h5py must read it itself."""
        if dset.chunks is None or not native(dset.dtype) or not hasattr(dset.id, "chunk_iter"):
            return None
        dcpl = dset.id.get_create_plist()
        filters = []
        for i in range(dcpl.get_nfilters()):
            code, _flags, values, _name = dcpl.get_filter(i)
            if code not in (DEFLATE, SHUFFLE, LZF) or (code == LZF and _LZF is None):
                return None
            filters.append((int(code), tuple(int(v) for v in values)))
        chunks = tuple(int(c) for c in dset.chunks)
        grid = tuple(-(-s // c) for s, c in zip(dset.shape, chunks))
        offsets = np.full(grid, -1, np.int64)
        sizes = np.zeros(grid, np.int64)
        masks = np.zeros(grid, np.int64)

        def visit(info) -> None:
            at = tuple(o // c for o, c in zip(info.chunk_offset, chunks))
            offsets[at], sizes[at], masks[at] = info.byte_offset, info.size, info.filter_mask

        try:
            dset.id.chunk_iter(visit)
        except Exception:  # an HDF5 too old for H5Dchunk_iter
            return None
        if offsets.size and (offsets < 0).any():  # unwritten chunks hold the fill value: HDF5 knows it
            return None
        return cls(tuple(dset.shape), chunks, dset.dtype, tuple(filters), offsets, sizes, masks)

    # ------------------------------------------------------------------ geometry
    @property
    def rows_per_chunk(self) -> int:
        return self.chunks[0]

    @property
    def chunk_bytes(self) -> int:
        return int(np.prod(self.chunks, dtype=np.int64)) * self.dtype.itemsize

    @property
    def row_addressable(self) -> bool:
        """Unfiltered chunks of whole rows: each row is a run of bytes at a known offset."""
        return not self.filters and self.chunks[1:] == self.shape[1:]

    def row_offsets(self, rows: np.ndarray) -> np.ndarray:
        """File offsets of rows (row-addressable indexes only)."""
        per = self.rows_per_chunk
        row_bytes = self.chunk_bytes // per
        return self.offsets.reshape(-1)[rows // per] + (rows % per) * row_bytes

    @cached_property
    def trailing_chunks(self) -> list[tuple[tuple[int, ...], tuple[slice, ...]]]:
        """For each chunk position beyond the first axis: its grid index and the slices it fills."""
        out: list[tuple[tuple[int, ...], tuple[slice, ...]]] = [((), ())]
        for size, c in zip(self.shape[1:], self.chunks[1:]):
            out = [(idx + (j,), sl + (slice(j * c, min(size, (j + 1) * c)),))
                   for idx, sl in out for j in range(-(-size // c))]
        return out

    # ------------------------------------------------------------------ bytes
    def rows_of(self, fd: int, at: tuple[int, ...], lo: int, hi: int, path: str, key: str = "") -> np.ndarray:
        """Rows [lo, hi) of chunk `at` (thread scratch): only those bytes when the chunk is
        stored unfiltered, else the whole chunk decoded."""
        if any(not int(self.masks[at]) >> i & 1 for i in range(len(self.filters))):
            return self.decode(fd, at, path, key=key)[lo:hi]
        row = self.chunk_bytes // self.chunks[0]
        part = scratch(0, (hi - lo) * row)
        got = os.preadv(fd, [part], int(self.offsets[at]) + lo * row)  # type: ignore[list-item]  # numpy's stubs make ndarray a Buffer from Python 3.12 on
        if got != part.size:
            raise OSError(f"{path}: short read of chunk {at} ({got} of {part.size} bytes): the file is truncated")
        return part.view(self.dtype).reshape(hi - lo, *self.chunks[1:])

    def decode(self, fd: int, at: tuple[int, ...], path: str, into: Optional[np.ndarray] = None,
               key: str = "") -> np.ndarray:
        """Chunk `at` as an array of the chunk's shape: in `into` (C-contiguous, chunk-sized)
        when given, else in this thread's scratch memory (valid until its next decode).
        BadInput naming the file and dataset `key` when a filter gives other than the chunk's size."""
        offset, size, mask = int(self.offsets[at]), int(self.sizes[at]), int(self.masks[at])
        nbytes = self.chunk_bytes
        active = [i for i in range(len(self.filters)) if not mask >> i & 1]
        raw = into.reshape(-1).view(np.uint8) if into is not None and not active else scratch(0, size)
        got = os.preadv(fd, [raw[:size]], offset)  # type: ignore[list-item]  # numpy's stubs make ndarray a Buffer from Python 3.12 on
        if got != size:
            raise OSError(f"{path}: short read of chunk {at} ({got} of {size} bytes): the file is truncated")
        data: np.ndarray = raw[:size]
        held = 0 if active else None  # the scratch slot `data` sits in: the next step writes elsewhere
        for i in reversed(active):
            code, values = self.filters[i]
            if code == DEFLATE:
                inflated = _inflate(data, nbytes)
                if inflated is None:
                    raise BadInput(f"{_named(path, key)}: chunk {at} does not inflate to the chunk's {nbytes} bytes "
                                   "(gzip): a damaged file")
                data, held = np.frombuffer(inflated, np.uint8), None
            elif code == LZF:
                held = 0 if held == 1 else 1
                out = scratch(held, nbytes)
                n = _LZF(data.ctypes.data, data.size, out.ctypes.data, nbytes)  # type: ignore[misc]  # load() refuses LZF without it
                if n != nbytes:
                    raise BadInput(f"{_named(path, key)}: chunk {at} does not decompress (lzf gave {n} of {nbytes} "
                                   "bytes): a damaged file")
                data = out
            else:  # SHUFFLE: byte j of element e was stored at j * count + e
                item = values[0] if values else self.dtype.itemsize
                count = data.size // item
                held = 0 if held == 2 else 2
                out = scratch(held, data.size)
                out[:count * item].reshape(count, item)[...] = data[:count * item].reshape(item, count).T
                out[count * item:] = data[count * item:]
                data = out
        if data.size != nbytes:
            raise BadInput(f"{_named(path, key)}: chunk {at} holds {data.size} bytes after decoding, expected {nbytes}")
        if into is None:
            return data.view(self.dtype).reshape(self.chunks)
        if active:
            into.reshape(-1).view(np.uint8)[:] = data
        return into


def _inflate(data: np.ndarray, nbytes: int) -> Optional[bytes]:
    """A deflate stream inflated, when it gives exactly `nbytes`; else None. Never more than
    nbytes + 1 bytes are made: a crafted chunk cannot force a large allocation (zlib.decompress
    would inflate it whole before any size check)."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, nbytes)  # type: ignore[arg-type]  # numpy's stubs make ndarray a Buffer from Python 3.12 on
        if not d.eof and d.decompress(d.unconsumed_tail, 1):
            return None  # more than the chunk holds
    except zlib.error:
        return None
    return out if d.eof and len(out) == nbytes else None


def _named(path: str, key: str) -> str:
    return f"{path}: dataset '{key}'" if key else path
