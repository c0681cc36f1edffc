"""Reading HDF5 sources: global row ranges into caller-owned buffers, outside HDF5's lock where it can.

The source's metadata (files, keys, shapes, dtypes, layouts, validation) is `mpidl.data.layout`'s
`H5Source`; its `open()` gives a `Reader` here, which opens the files in the thread that uses it
(never inherited across fork): contiguous rows mapped or read with pread, chunks read raw and
decoded on a pool of threads, everything else through h5py.
"""
from __future__ import annotations

import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np

from mpidl import watchdog
from mpidl.data.chunks import ChunkIndex, cuts_last_axis_only, native
from mpidl.data.layout import H5Source

PIECE_BYTES = 4 << 20  # rows the pool reads as one task: large reads, enough tasks to share out
DIRECT_ROW_BYTES = 4096  # rows at least this large are copied straight into their batch (see loader.py)


class _Contiguous:
    """An unfiltered contiguous dataset: row r at offset + r * row_bytes."""

    row_addressable = True

    def __init__(self, offset: int, row_bytes: int):
        self.offset, self.row_bytes = offset, row_bytes

    def row_offsets(self, rows: np.ndarray) -> np.ndarray:
        return self.offset + rows * self.row_bytes


Storage = Union[_Contiguous, ChunkIndex, None]  # None: h5py reads it


def default_workers(world) -> int:
    """Reading threads for one rank: the cores it may run on, and no more than its share of
    the node's cores (ranks bound to a socket would otherwise each take the whole socket)."""
    cores = os.cpu_count() or 1
    try:
        mine = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        mine = cores
    return max(1, min(16, mine, cores // max(1, getattr(world, "local_size", 1))))


class Reader:
    """Open file handles of one source, for one thread and its pool. Use as a context manager.

    Each dataset in each file is read the cheapest way its storage allows:
      contiguous or whole-row unfiltered chunks: rows are bytes at known offsets, read with
          `pread` straight into the caller's buffer (no HDF5 call, the GIL released);
      other chunked data (compressed, or chunks that split rows): chunks read with `pread` and
          decoded on a pool of `workers` threads (see chunks.py), then copied into place, or,
          for chunks that cut only the last axis, kept as stored (start_chunk_rows);
      anything else (other filters, unwritten chunks, external storage): h5py's read_direct.
    `start` submits a window's reads to the pool and returns at once; `read` waits.
    """

    def __init__(self, source: H5Source, workers: int = 1):
        import h5py

        self.source = source
        layouts = source._need()
        self.keys = source.keys
        self._paths = [lay.path for lay in layouts]
        # A chunk cache that holds a read's worth of chunks avoids re-decompressing when a
        # block boundary splits a chunk (for what h5py still reads itself).
        self._files = [h5py.File(p, "r", locking=False, rdcc_nbytes=64 << 20, rdcc_nslots=10007)
                       for p in self._paths]
        self._dsets = [{k: f[k] for k in source.keys} for f in self._files]
        self._fds = [os.open(p, os.O_RDONLY) for p in self._paths]
        self._row_bytes = {k: source.row_bytes_of(k) for k in source.keys}
        cache = source.__dict__.setdefault("_chunk_indexes", {})
        self._storage: list[dict[str, Storage]] = []
        for path, fd, dsets in zip(self._paths, self._fds, self._dsets):
            self._storage.append({k: _storage_of(d, fd, self._row_bytes[k], cache, (path, k))
                                  for k, d in dsets.items()})
        self._starts = np.cumsum([0] + [lay.rows for lay in layouts])
        self._base = source.row_range[0] if source.row_range else 0
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="mpidl-decode")
        self._maps: dict[int, mmap.mmap] = {}  # file -> its read-only mapping (mapped keys)
        self._views: dict[str, Optional[list[np.ndarray]]] = {}  # key -> per file, its rows mapped; None: pread

    # ------------------------------------------------------------------ what each key allows
    def addressable(self, key: str) -> bool:
        """True when every file stores `key`'s rows as bytes at known offsets (see read_rows)."""
        return all(getattr(st[key], "row_addressable", False) for st in self._storage)

    def paths(self, key: str) -> list[str]:
        """How `key` is read, per file: 'mapped' (contiguous in every file: from a mapping of
        the file, see mapped), 'bytes' (contiguous or whole-row chunks, pread), 'chunks' (pread
        and decode on the pool) or 'h5py' (read_direct)."""
        if self.mapped(key):
            return ["mapped"] * len(self._storage)
        return ["bytes" if getattr(st[key], "row_addressable", False) else "chunks" if st[key] is not None
                else "h5py" for st in self._storage]

    # ------------------------------------------------------------------ rows, any order
    def read_rows(self, key: str, rows: np.ndarray, out: np.ndarray) -> None:
        """Source rows `rows` (any order) into out[0:len(rows)], one pread per run of rows
        that lie back to back in the file. For addressable keys; the caller groups rows so
        runs are long. Runs here, in the calling thread."""
        for runs in self.row_runs(key, rows, max(1, len(rows))):  # one buffer: at most one list
            self.read_runs(key, runs, byte_view(out))

    def row_runs(self, key: str, rows: np.ndarray, per: int) -> list[list[tuple[int, int, int, int]]]:
        """The reads that bring source rows `rows` (any order) into buffers of `per` rows, one
        buffer after the other: per buffer, a list of (file, file offset, byte in the buffer,
        bytes), one per run of rows back to back in the file (read_runs reads them).

        Worked out for many buffers at once (a window's batches), so that reading a batch costs
        its preads and almost no Python."""
        rows, files = self._files_of(rows)
        n, rb = rows.size, self._row_bytes[key]
        if n == 0:
            return []
        many = len(self._fds) > 1  # with one file, no row needs sorting into its file
        offsets = np.empty(n, np.int64)
        for i in (np.unique(files) if many else (0,)):
            sel = files == i if many else slice(None)
            offsets[sel] = self._storage[i][key].row_offsets(rows[sel] - int(self._starts[i]))  # type: ignore[union-attr]  # addressable: not None
        place = np.arange(n) % per
        starts = np.flatnonzero(np.concatenate(([True], (np.diff(offsets) != rb) | (np.diff(files) != 0)
                                                | (place[1:] == 0))))
        sizes = np.diff(np.append(starts, n)) * rb
        runs = list(zip(files[starts].tolist(), offsets[starts].tolist(), (place[starts] * rb).tolist(),
                        sizes.tolist()))
        return _per_buffer(runs, starts, n, per)

    def _files_of(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Source rows `rows` in the files' numbering (past the row range's start), and the file
        each lies in."""
        rows = np.asarray(rows, np.int64) + self._base
        if len(self._fds) == 1:
            return rows, np.zeros(rows.size, np.int64)
        return rows, np.searchsorted(self._starts, rows, side="right") - 1

    # ------------------------------------------------------------------ mapped rows
    def mapped(self, key: str) -> bool:
        """True when `key`'s rows are large (>= DIRECT_ROW_BYTES) and every file stores them
        contiguously and maps: a batch's rows are then gathered from read-only mappings of the
        files (take_rows: one numpy `take` per stretch of the batch's rows from one file, one a
        batch with one file), not read with one `pread` per run of rows. The copy is the same,
        but one call moves many runs with the GIL released, where each pread takes the GIL back
        (every ~12 us for 192 KiB runs), and the kernel's per-page work of a read is gone. 12 KiB
        rows on two cores, one process against h5py's large reads, passes alternating: 0.81 ->
        0.94. MPIDL_MAPPED=0 reads with pread instead, for comparison or where mapping files is
        unwelcome; so does a file system that cannot map files, or a file already too short for
        the dataset (pread then names it at the first short read). Each mapped file holds one
        more descriptor while the reader is open.

        An I/O error on a mapped page ends the process with SIGBUS instead of raising OSError, as
        with numpy.memmap: a file truncated or rewritten while it is read, or a network file
        system failing (`mpidl train` prints the rank's Python stack then, through faulthandler;
        mpirun and srun end the job). MPIDL_MAPPED=0 keeps such errors exceptions."""
        if key not in self._views:
            views = None
            if os.environ.get("MPIDL_MAPPED", "1") != "0" and self._row_bytes[key] >= DIRECT_ROW_BYTES and all(
                    isinstance(st[key], _Contiguous) for st in self._storage):
                try:
                    views = [self._map_rows(i, key) for i in range(len(self._storage))]
                except OSError:
                    views = None
            self._views[key] = views
        return self._views[key] is not None

    def _map_rows(self, i: int, key: str) -> np.ndarray:
        """File i's rows of `key` as a (rows, row bytes) uint8 array over a mapping of the file."""
        rows, rb = int(self._starts[i + 1] - self._starts[i]), self._row_bytes[key]
        st = self._storage[i][key]
        assert isinstance(st, _Contiguous), key  # mapped() maps contiguous storage only
        offset, size = st.offset, os.fstat(self._fds[i]).st_size
        if offset + rows * rb > size:  # reading a mapping past the end of its file raises SIGBUS
            raise OSError(f"{self._paths[i]}: '{key}' ends past the file's end")
        if i not in self._maps:
            self._maps[i] = mmap.mmap(self._fds[i], 0, prot=mmap.PROT_READ)
        return np.frombuffer(self._maps[i], np.uint8, rows * rb, offset).reshape(rows, rb)

    def row_segments(self, key: str, rows: np.ndarray, per: int) -> list[list[tuple[int, int, np.ndarray]]]:
        """row_runs for a mapped key: per buffer of `per` rows, (file, position in the buffer,
        the file's rows) for each stretch of the buffer's rows that come from one file."""
        rows, files = self._files_of(rows)
        n = rows.size
        if n == 0:
            return []
        local = rows - self._starts[files]
        starts = np.flatnonzero(np.concatenate(([True], (np.diff(files) != 0) | (np.arange(1, n) % per == 0))))
        ends = np.append(starts[1:], n).tolist()
        segments = [(f, a % per, local[a:b]) for f, a, b in zip(files[starts].tolist(), starts.tolist(), ends)]
        return _per_buffer(segments, starts, n, per)

    def take_rows(self, key: str, segments: list[tuple[int, int, np.ndarray]], out: np.ndarray,
                  lo: int = 0, hi: Optional[int] = None) -> None:
        """Rows `segments` (from row_segments) of mapped `key` into out[lo:hi] (out: the buffer
        as (rows, row bytes) uint8); positions outside [lo, hi) are left to another call."""
        views = self._views.get(key)
        if views is None:
            raise ValueError(f"'{key}' is not read from a mapping (see Reader.mapped)")
        hi = len(out) if hi is None else hi
        for i, at, local in segments:
            a, b = max(lo, at), min(hi, at + len(local))
            if a < b:  # mode "raise" would buffer the whole output first; the rows are in range
                np.take(views[i], local[a - at:b - at], axis=0, out=out[a:b], mode="clip")

    def unmap_pages(self) -> None:
        """Drop this process's page-table entries of the mapped files (the page cache keeps
        the data), so that its resident memory holds about a window of them, not every page
        it has touched: reads after this fault the pages back in, cheaply."""
        for m in self._maps.values():
            m.madvise(mmap.MADV_DONTNEED)

    def read_runs(self, key: str, runs: list[tuple[int, int, int, int]], out: memoryview) -> None:
        """The reads `runs` of `key` (from row_runs) into `out`, a buffer's bytes (byte_view)."""
        for i, offset, at, size in runs:
            got = os.preadv(self._fds[i], [out[at:at + size]], offset)
            if got != size:
                raise OSError(f"{self._paths[i]}: short read of '{key}' at byte {offset} "
                              f"({got} of {size} bytes): the file is truncated")

    # ------------------------------------------------------------------ whole chunk rows
    def column_chunks(self, key: str) -> Optional[tuple[int, int, int]]:
        """(R, C, S) when every file stores `key` in chunks of R rows that cut only the last
        axis, into C equal parts (h5py's auto chunks of wide rows); S: the sub-rows of a row
        (the product of the axes between the first and the last). Else None.

        A row then spans C chunks, and copying each chunk's piece into whole rows would
        cost a strided copy per piece: such keys are read as whole chunk rows, each chunk
        decoded (or read, when stored raw) straight into its place, and batches gather from
        them (start_chunk_rows)."""
        found = set()
        for st in self._storage:
            index = st[key]
            if not isinstance(index, ChunkIndex) or index.row_addressable:
                return None
            if not cuts_last_axis_only(index.chunks, index.shape):
                return None
            found.add(index.chunks)
        if len(found) != 1:
            return None
        chunks = found.pop()
        return chunks[0], self.source.shapes[key][-1] // chunks[-1], int(np.prod(chunks[1:-1], dtype=np.int64))

    def chunk_rows(self, key: str, ranges: Sequence[tuple[int, int]]) -> tuple[list[tuple[int, int]], np.ndarray]:
        """The chunk rows (file, chunk row) that `ranges` (source rows, laid end to end) touch,
        in order, and where each of those rows lies once they are read into a buffer shaped
        (chunk rows, C, R, S, last axis / C) by start_chunk_rows: as an index of that buffer's
        sub-rows (flattened to (-1, last axis / C)), the first of the row's first column chunk."""
        shape = self.column_chunks(key)
        assert shape is not None, key
        per, parts, sub = shape
        slots: dict[tuple[int, int], int] = {}
        where = np.empty(sum(b - a for a, b in ranges), np.int64)
        for i, local, n, pos in self._spans(ranges):
            for j, r0, r1 in _chunk_pieces(local, n, per):
                k = slots.setdefault((i, j), len(slots))
                where[pos + r0 - local:pos + r1 - local] = (
                    (k * parts * per + np.arange(r0 - j * per, r1 - j * per)) * sub)
        return list(slots), where

    def _spans(self, ranges: Sequence[tuple[int, int]]) -> Iterator[tuple[int, int, int, int]]:
        """`ranges` (source rows, laid end to end) cut at file boundaries: (file, first local
        row, rows, position in the ranges' order)."""
        pos = 0
        for start, stop in ranges:
            a, b = start + self._base, stop + self._base
            i = int(np.searchsorted(self._starts, a, side="right")) - 1
            while a < b:
                n = min(b, int(self._starts[i + 1])) - a
                yield i, a - int(self._starts[i]), n, pos
                pos += n
                a += n
                i += 1

    def start_chunk_rows(self, key: str, rows: Sequence[tuple[int, int]], out: np.ndarray) -> "Pending":
        """Read chunk rows `rows` (file, chunk row) of `key` whole into out[0], out[1], ...
        (out shaped (chunk rows, C, *chunk shape)), each chunk straight into its place;
        one pool task per chunk row, or, for chunks stored raw, per PIECE_BYTES of the file.
        Returns at once."""
        runs = self._raw_chunk_runs(key, rows)
        if runs is not None:
            into = byte_view(out)
            return Pending([self._pool.submit(self.read_runs, key, part, into) for part in runs])

        def read(k: int, i: int, j: int) -> None:
            index: ChunkIndex = self._storage[i][key]  # type: ignore[assignment]  # a chunked key
            middle = (0,) * (len(index.chunks) - 2)
            for c in range(out.shape[1]):
                index.decode(self._fds[i], (j, *middle, c), self._paths[i], into=out[k, c], key=key)
        return Pending([self._pool.submit(read, k, i, j) for k, (i, j) in enumerate(rows)])

    def _raw_chunk_runs(self, key: str, rows: Sequence[tuple[int, int]]) -> Optional[list[list[tuple]]]:
        """For chunks stored raw (no filters): the reads of chunk rows `rows` as start_chunk_rows
        lays them out, chunks that follow each other both in the file and in the buffer read as
        one (h5py writes a chunk row's chunks back to back: one pread, not one a chunk), cut
        into tasks of about PIECE_BYTES. None when some chunk is filtered."""
        indexes: list[ChunkIndex] = [self._storage[i][key] for i in range(len(self._fds))]  # type: ignore[misc]  # a chunked key
        if any(index.filters for index in indexes):
            return None
        size = indexes[0].chunk_bytes
        grid = [index.offsets.reshape(len(index.offsets), -1) for index in indexes]  # (chunk row, C)
        files = np.repeat([i for i, _ in rows], grid[0].shape[1])
        offsets = np.concatenate([grid[i][j] for i, j in rows])
        if offsets.size == 0:
            return []
        starts = np.flatnonzero(np.concatenate(([True], (np.diff(offsets) != size) | (np.diff(files) != 0))))
        ends = np.append(starts[1:], offsets.size)
        tasks: list[list[tuple]] = [[]]
        filled, step = 0, max(1, PIECE_BYTES // size)
        for a, b in zip(starts.tolist(), ends.tolist()):
            for c in range(a, b, step):  # pieces the pool can share out
                n = min(b, c + step) - c
                tasks[-1].append((int(files[c]), int(offsets[c]), c * size, n * size))
                filled += n * size
                if filled >= PIECE_BYTES:
                    tasks.append([])
                    filled = 0
        return [t for t in tasks if t]

    # ------------------------------------------------------------------ row ranges
    def read(self, key: str, start: int, stop: int, out: np.ndarray) -> None:
        """Rows [start, stop) of the source (its own numbering) into out[0:stop-start]."""
        self.start({key: out}, [(start, stop)]).wait()

    def start(self, outs: dict[str, np.ndarray], ranges: Sequence[tuple[int, int]]) -> "Pending":
        """Begin reading `ranges` (source rows, laid end to end) of each key into outs[key].

        Returns at once; the reads run on the pool. `wait()` before touching the buffers.
        """
        futures = [self._pool.submit(task) for key, out in outs.items() for task in self._tasks(key, ranges, out)]
        return Pending(futures)

    def _tasks(self, key: str, ranges: Sequence[tuple[int, int]], out: np.ndarray) -> list[Callable[[], None]]:
        """The reads of `ranges` as pool tasks of about a MiB or more each: many small ranges
        (an exact shuffle's) share a task, large ones are cut so the pool can share them out."""
        tasks: list[Callable[[], None]] = []
        pieces: dict[tuple[int, int], list[tuple[int, int, int]]] = {}  # (file, chunk row) -> (r0, r1, pos)
        step = max(1, PIECE_BYTES // max(1, self._row_bytes[key]))
        segments: list[tuple[int, int, int, int]] = []  # (file, local row, rows, pos), read without decoding
        pending_rows = 0
        for i, local, n, pos in self._spans(ranges):
            st = self._storage[i][key]
            if isinstance(st, ChunkIndex) and not st.row_addressable:
                per = st.rows_per_chunk
                for j, r0, r1 in _chunk_pieces(local, n, per):
                    pieces.setdefault((i, j), []).append((r0 - j * per, r1 - j * per, pos + r0 - local))
            else:
                for p in range(0, n, step):
                    m = min(step, n - p)
                    segments.append((i, local + p, m, pos + p))
                    pending_rows += m
                    if pending_rows >= step:
                        tasks.append(partial(self._segments, key, segments, out))
                        segments, pending_rows = [], 0
        if segments:
            tasks.append(partial(self._segments, key, segments, out))
        # Chunk rows go to the pool in groups of about a MiB: fewer, larger tasks.
        group: list[tuple[int, int]] = []
        size = 0
        for (i, j) in pieces:
            group.append((i, j))
            index: ChunkIndex = self._storage[i][key]  # type: ignore[assignment]  # pieces: chunked files only
            size += index.chunk_bytes * len(index.trailing_chunks)
            if size >= 1 << 20:
                tasks.append(partial(self._decode, key, group, pieces, out))
                group, size = [], 0
        if group:
            tasks.append(partial(self._decode, key, group, pieces, out))
        return tasks

    def _segments(self, key: str, segments: list[tuple[int, int, int, int]], out: np.ndarray) -> None:
        """Rows of (file, local row, rows, pos) segments into out[pos:...] (runs on the pool).

        Byte-addressable rows go in one read_rows call (it coalesces their runs), straight
        into `out` when their places are consecutive there, as they usually are.
        """
        rows, places = [], []
        for i, local, m, pos in segments:
            if self._storage[i][key] is None:
                into = np.empty((m, *out.shape[1:]), out.dtype)  # read_direct needs a whole array
                self._dsets[i][key].read_direct(into, np.s_[local:local + m])
                out[pos:pos + m] = into
            else:
                rows.append(np.arange(local, local + m) + int(self._starts[i]) - self._base)
                places.append(np.arange(pos, pos + m))
        if not rows:
            return
        flat, at = np.concatenate(rows), np.concatenate(places)
        first = int(at[0])
        if out.flags.c_contiguous and int(at[-1]) - first + 1 == at.size:  # consecutive places
            self.read_rows(key, flat, out[first:first + at.size])
        else:
            into = np.empty((at.size, *out.shape[1:]), out.dtype)
            self.read_rows(key, flat, into)
            out[at] = into

    def _decode(self, key: str, group: list[tuple[int, int]], pieces: dict, out: np.ndarray) -> None:
        """Decode chunk rows `group` and copy their pieces into place (runs on the pool).

        A chunk that splits rows fills its columns of the pieces' rows: a strided copy, rows
        in file order (the batch gathers them later, whole).
        """
        for i, j in group:
            index: ChunkIndex = self._storage[i][key]  # type: ignore[assignment]  # a chunked key
            wanted = pieces[(i, j)]
            lo, hi = min(r0 for r0, _, _ in wanted), max(r1 for _, r1, _ in wanted)
            for at, dst in index.trailing_chunks:
                chunk = index.rows_of(self._fds[i], (j, *at), lo, hi, self._paths[i], key)
                src = tuple(slice(0, s.stop - s.start) for s in dst)
                for r0, r1, p in wanted:
                    out[(slice(p, p + r1 - r0), *dst)] = chunk[(slice(r0 - lo, r1 - lo), *src)]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)  # no task may outlive the descriptors
        self._views = {}
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:  # a view still exported (an error left one behind): the GC unmaps it
                pass
        self._maps = {}
        for f in self._files:
            f.close()
        for fd in self._fds:
            os.close(fd)
        self._files, self._fds = [], []

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _per_buffer(pieces: list, starts: np.ndarray, n: int, per: int) -> list[list]:
    """`pieces` (one per position in `starts`, of `n` rows laid end to end, none crossing a
    multiple of `per`) grouped by buffer of `per` rows."""
    cuts = np.searchsorted(starts, np.arange(0, n, per)).tolist() + [len(pieces)]
    return [pieces[a:b] for a, b in zip(cuts, cuts[1:])]


def byte_view(a: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array, to read into."""
    if not a.flags.c_contiguous:  # reshape would copy, and the reads would land in the copy
        raise ValueError("reads go into C-contiguous arrays only")
    return memoryview(a.reshape(-1).view(np.uint8))  # type: ignore[arg-type]  # numpy's stubs make ndarray a Buffer from Python 3.12 on


class Pending:
    """Reads in flight on a Reader's pool."""

    def __init__(self, futures: list[Future]):
        self.futures = futures

    def done(self) -> bool:
        return all(f.done() for f in self.futures)

    def wait(self) -> None:
        for f in self.futures:
            f.result()  # re-raises a worker's error here, in the caller's thread
            watchdog.progress()  # each piece read (about a MiB): a slow file system is no hang


def _storage_of(d, fd: int, row_bytes: int, cache: dict, name: tuple[str, str]) -> Storage:
    """How to read dataset `d` without HDF5, checked against HDF5 on its first bytes; None: use h5py."""
    if d.chunks is None:
        offset = _byte_offset(d)
        return None if offset is None else _Contiguous(offset, row_bytes)
    if name not in cache:
        cache[name] = ChunkIndex.of(d)
    index = cache[name]
    if index is None or index.offsets.size == 0:
        return None
    # The offsets come from HDF5's own index; one chunk's stored bytes confirm they are file offsets.
    first = (0,) * len(index.chunks)
    _mask, stored = d.id.read_direct_chunk(first)
    if os.pread(fd, len(stored), int(index.offsets[first])) != stored:
        return None
    return index


def _byte_offset(d) -> Optional[int]:
    """The file offset of a contiguous, unfiltered, native-order dataset; else None."""
    if d.chunks is not None or d.compression is not None or not native(d.dtype):
        return None
    if d.id.get_create_plist().get_nfilters():
        return None
    try:
        return d.id.get_offset()
    except Exception:  # external storage or not yet allocated
        return None


def _chunk_pieces(local: int, n: int, per: int) -> Iterator[tuple[int, int, int]]:
    """Local rows [local, local + n) cut at chunk rows of `per` rows: (chunk row, r0, r1)."""
    for j in range(local // per, (local + n - 1) // per + 1):
        yield j, max(local, j * per), min(local + n, (j + 1) * per)
