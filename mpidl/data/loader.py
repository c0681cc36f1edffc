"""ShardedLoader: this rank's rows of an HDF5 source, reshuffled per epoch, prefetched.

A background reader thread hands batches to the consumer, `prefetch` ahead, so reading
overlaps the model's compute; a pool of `workers` threads does the reading and decoding
(HDF5's global lock is never taken on these paths: see source.py and chunks.py). Per key:

    large rows (>= 4 KiB) stored as plain bytes (contiguous, or unfiltered chunks of whole
        rows): each batch's rows are copied straight into a batch slot: of a contiguous
        dataset, from read-only mappings of the files, one numpy `take` per stretch of rows from
        one file (one a batch with one file; the pages unmapped again window by window); of
        chunks, one `pread` per run of consecutive rows (the plan moves large rows in runs of
        ~192 KiB);
    chunks that cut only the last axis (h5py's auto chunks of wide rows: a row spans many
        chunks): a window's chunk rows are decoded by the pool, or, stored raw, read in runs
        of back-to-back chunks, straight into a window buffer laid out as the chunks are, and
        each batch gathers every row's pieces from there into its slot (one copy after the read;
        large rows move in runs here too, so a run's pieces of one chunk lie side by side);
    everything else (small rows, other compressed chunks, other splits): a window of whole
        blocks is read or decoded by the pool into a window buffer, rows in file order, and
        each batch gathers its rows from there into its slot.
Two window buffers: the pool fills the next while batches are cut from this one.

Batches are assembled by `workers` threads, each with one batch queued behind the one it works on,
and handed on in order as soon as they are ready; batches under 1 MiB, and every batch where there
are two workers or fewer, are cut by the reader thread itself (with two workers and batches of a MiB
or more, half of each batch by an assembler at the same time, two batches a hop). The reader refills
the consumer's queue once it has drained to half, so it takes the GIL from the training thread once
per several batches; batches under 1 MiB queue up to 4 MiB (at most 64 of them, at least
`prefetch`), so that on a small model the reader wakes once per tens of steps. Free slots are reused
last-released-first, so that when the consumer keeps up a few slots cycle in the CPU's cache. Memory
is bounded by two windows of the windowed keys (plus the chunk rows a window's edges cut, for chunks
read as stored) and `depth + 2 + workers` batch slots (depth: the queue's, above), whatever the
dataset's size; mapped pages (page cache, counted in RSS while mapped) by about a window.
On CUDA the slots are pinned and the consumer copies each batch with non_blocking=True, on a stream
of its own that the compute stream waits on, so the copy overlaps the device's work on the batch
before (MPIDL_COPY_STREAM=0 copies on the compute stream, for comparison); a slot is refilled only
after its copy has finished.
`loader.spent` tells where the reader's time went in the last pass.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from mpidl import watchdog
from mpidl.data.layout import H5Source
from mpidl.data.shard import RankPlan, check_shape, eval_steps, plan_eval, plan_rank, steps_per_epoch
from mpidl.data.source import DIRECT_ROW_BYTES, Pending, byte_view, default_workers
from mpidl.data.staging import Staging
from mpidl.errors import BadInput

_DONE = object()


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


class _Handoff:
    """Batches from the reader thread to the consumer, at most `depth` waiting.

    A full queue makes the reader sleep until the consumer has drained it to half, so the
    reader wakes once per several batches, not once per batch: each wake-up takes the GIL from
    the training thread at a moment it does not choose, which on a small model costs more
    than the batch's copy. One reader and one consumer share one condition: the consumer waits
    only on an empty queue and the reader only on a full one, never both at once.
    """

    def __init__(self, depth: int, stop: threading.Event):
        self.items: deque = deque()
        self.depth, self.low = max(1, depth), max(1, depth) // 2
        self.stop = stop
        self.ready = threading.Condition(threading.Lock())

    def put(self, item: Any) -> bool:
        """Queue `item`, unless asked to stop (False)."""
        with self.ready:
            if len(self.items) >= self.depth:
                while len(self.items) > self.low:
                    if self.stop.is_set():
                        return False
                    self.ready.wait(0.05)
            self.items.append(item)
            self.ready.notify()
        return True

    def get(self) -> Any:
        """The oldest batch; _DONE once asked to stop."""
        with self.ready:
            while not self.items:
                if self.stop.is_set():
                    return _DONE
                self.ready.wait(0.05)
            item = self.items.popleft()
            if len(self.items) == self.low:
                self.ready.notify()
            return item


def _get(q: queue.Queue, stop: threading.Event) -> Any:
    while not stop.is_set():
        try:
            return q.get(timeout=0.05)
        except queue.Empty:
            continue
    return _DONE


RUN_BYTES = 192 << 10    # target bytes per direct read: amortises the call, keeps batches mixed
QUEUED_PER_WORKER = 2    # batches assigned to each assembler thread at once
INLINE_BATCH_BYTES = 1 << 20  # smaller batches are cut by the reader thread itself
SMALL_QUEUE_BYTES = 4 << 20   # and queue up to this much, at most SMALL_QUEUE_BATCHES of them
SMALL_QUEUE_BATCHES = 64
SHARED_GROUP = 2              # batches cut together by the reader and one assembler
INLINE_WORKERS = 2            # with this many workers or fewer, the reader thread cuts every batch
_ASSEMBLED: Future = Future()
_ASSEMBLED.set_result(None)


class _Pipeline:
    """The reader thread of one pass over a RankPlan, and the buffers it fills.

    Windows are read (or decoded) by the reader's pool into one of two window buffers, rows in
    file order; the next window is read while batches are cut from this one. A batch is
    assembled in a slot of a ring of reused batch buffers by an assembler thread (several
    batches at once): rows of windowed keys gathered from the window, large rows of byte-
    addressable keys read straight from the file. Batches are handed on in order; a slot is
    reused once the consumer has released it (on CUDA: once its copy to the device is done),
    a window buffer once every batch cut from it is assembled.
    """

    def __init__(self, source: H5Source, plan: RankPlan, start_step: int, prefetch: int, pinned: bool,
                 workers: int = 1):
        self.source, self.plan, self.workers = source, plan, workers
        self.keys = source.keys
        self.shapes, self.dtypes = source.shapes, source.dtypes
        self.batch, self.pinned = plan.batch, pinned
        self.batch_bytes = plan.batch * sum(source.row_bytes_of(k) for k in self.keys)
        # Where the reader thread's time goes (seconds), for benchmarks and slow-input diagnosis.
        self.spent = dict.fromkeys(("window_wait", "slot_wait", "assembly_wait", "consumer_wait"), 0.0)
        self.stop = threading.Event()
        # Each wake-up of the reader takes the GIL from the training thread at a moment it does
        # not choose (measured on a 13 ms CPU step: the data hand-off cost 210-300 us a step at a
        # queue of 4, 125-170 us at 32), so small batches queue deeper.
        depth = prefetch
        if self.batch_bytes < INLINE_BATCH_BYTES:
            depth = max(prefetch, min(SMALL_QUEUE_BATCHES, SMALL_QUEUE_BYTES // max(1, self.batch_bytes)))
        self.batches = _Handoff(depth, self.stop)
        # Batches are written into a ring of reused buffers: fresh arrays per batch would cost
        # a page fault per 4 KiB and halve throughput. A slot is free again once the consumer
        # has asked for the batch after it (and, on CUDA, once its copy to the device is done).
        slots = depth + 2 + workers
        rings = {k: self._alloc(k, slots) for k in self.keys}
        self.ring = [{k: rings[k][i] for k in self.keys} for i in range(slots)]
        self.ring_events: list[Optional[torch.cuda.Event]] = [None] * len(self.ring)
        # On the CPU, last released first reused: when the consumer keeps up, a few slots cycle
        # and stay in the CPU's cache (a FIFO walks the whole ring, ~24 MiB of 3 MiB batches).
        # On CUDA, oldest first: the slot released last may still be copying to the device.
        self.free_slots: queue.Queue = queue.Queue() if pinned else queue.LifoQueue()
        for i in range(len(self.ring)):
            self.free_slots.put(i)
        # Skip whole windows before start_step; the rest is skipped inside the first one.
        first, skip = 0, start_step * self.batch
        while first < len(plan.windows) and skip >= plan.windows[first].rows:
            skip -= plan.windows[first].rows
            first += 1
        self.first_window, self.skip_rows = first, skip
        self.thread = threading.Thread(target=self._guard, daemon=True, name="mpidl-reader")
        self.thread.start()

    def _alloc(self, key: str, slots: int) -> list[torch.Tensor]:
        """`slots` batch buffers of `key`. On the CPU they are views of one array: at 4 MiB and
        more numpy asks the kernel for transparent huge pages (fewer TLB misses on the copies
        into the ring; a 3 MiB batch on its own gets none)."""
        shape, dtype = (self.batch, *self.shapes[key]), self.dtypes[key]
        if self.pinned:
            return [torch.empty(shape, dtype=_torch_dtype(dtype), pin_memory=True) for _ in range(slots)]
        block = np.empty((slots, *shape), dtype)
        return [torch.from_numpy(block[i]) for i in range(slots)]

    def _guard(self) -> None:
        try:
            self._read()
        except BaseException as e:  # handed to the consumer, which raises it in its own thread
            self.batches.put(_Failed(e))

    def _read(self) -> None:
        src, clock, spent = self.source, time.perf_counter, self.spent
        with src.open(self.workers) as reader, ThreadPoolExecutor(self.workers, "mpidl-batch") as assembler:
            direct = [k for k in self.keys if src.row_bytes_of(k) >= DIRECT_ROW_BYTES and reader.addressable(k)]
            windows = self.plan.windows[self.first_window:]
            # Keys whose rows span several chunks are held as the chunks store them (whole chunk
            # rows, decoded in place); the other windowed keys as rows in file order.
            chunked = {k: reader.column_chunks(k) for k in self.keys if k not in direct}
            columnar = {k: shape for k, shape in chunked.items() if shape is not None}
            windowed = [k for k in self.keys if k not in direct and k not in columnar]
            chunk_rows = {k: [reader.chunk_rows(k, _coalesce(w.ranges)) for w in windows] for k in columnar}
            max_rows = max((w.rows for w in windows), default=0)
            bufs = [{k: np.empty((max_rows, *self.shapes[k]), self.dtypes[k]) for k in windowed}
                    for _ in range(min(2, len(windows)))]
            for k, (per, parts, _sub) in columnar.items():
                most = max(len(rows) for rows, _ in chunk_rows[k])
                chunk = (per, *self.shapes[k][:-1], self.shapes[k][-1] // parts)
                for window_buf in bufs:
                    window_buf[k] = np.empty((most, parts, *chunk), self.dtypes[k])
            # Per columnar key: the sub-row offsets of a row's pieces, shaped (S, C), added to
            # where a row starts (chunk_rows) they index the buffer's sub-rows of one column chunk.
            pieces = {k: np.arange(sub)[:, None] + np.arange(parts)[None, :] * per * sub
                      for k, (per, parts, sub) in columnar.items()}
            cut: list[list[Future]] = [[], []]  # assembly of batches cut from each window buffer
            slots = [{k: t.numpy() for k, t in ring.items()} for ring in self.ring]
            mapped = {k for k in direct if reader.mapped(k)}  # gathered from a mapping of the file
            slot_bytes = [{k: byte_view(arrays[k]) for k in direct if k not in mapped} for arrays in slots]
            slot_rows = [{k: arrays[k].reshape(self.batch, -1).view(np.uint8) for k in mapped} for arrays in slots]

            def fill(n: int) -> Pending:  # window n into buffer n % 2, once no batch still reads it
                while inflight and not all(f.done() for f in cut[n % 2]):
                    if not hand_on():
                        break  # stopped: the reader returns at its next slot
                for f in cut[n % 2]:
                    f.result()
                cut[n % 2] = []
                buf = bufs[n % 2]
                pending = reader.start({k: buf[k] for k in windowed}, _coalesce(windows[n].ranges))
                for k in columnar:
                    pending.futures += reader.start_chunk_rows(k, chunk_rows[k][n][0], buf[k]).futures
                return pending

            def assemble(slot: int, n: int, idx: np.ndarray, runs: list, part: int = 0, parts: int = 1) -> None:
                """Part `part` of `parts` of the batch into `slot`: that share of its rows and reads."""
                out, buf = slots[slot], bufs[n % 2]
                lo, hi = idx.size * part // parts, idx.size * (part + 1) // parts
                rows = idx[lo:hi]
                for k in windowed:  # mode "raise" would buffer the whole output first
                    np.take(buf[k], rows, axis=0, out=out[k][lo:hi], mode="clip")
                for k, (_per, cols, sub) in columnar.items():  # each row from its C pieces
                    at = chunk_rows[k][n][1][rows]
                    flat = buf[k].reshape(-1, buf[k].shape[-1])
                    into = out[k][lo:hi].reshape(hi - lo, sub, cols, -1)
                    np.take(flat, at[:, None, None] + pieces[k], axis=0, out=into, mode="clip")
                for k, r in zip(direct, runs):
                    if k in mapped:
                        reader.take_rows(k, r, slot_rows[slot][k], lo, hi)
                    else:
                        reader.read_runs(k, r[len(r) * part // parts:len(r) * (part + 1) // parts], slot_bytes[slot][k])

            def assemble_halves(group: list, n: int, part: int) -> None:
                for slot, idx, runs in group:
                    assemble(slot, n, idx, runs, part, 2)

            def assemble_shared(group: list, n: int) -> None:
                """Batches `group` ((slot, idx, runs) each) assembled by this thread and an idle
                assembler, half of each batch each: one hop for the group."""
                half = assembler.submit(assemble_halves, group, n, 1)
                assemble_halves(group, n, 0)
                half.result()

            inflight: deque = deque()  # (assembly, slot) in batch order

            def hand_on() -> bool:  # the oldest batch, once assembled, to the consumer
                done, slot = inflight.popleft()
                t = clock()
                done.result()
                spent["assembly_wait"] += clock() - t
                watchdog.progress()  # a rank waiting for data sees it come (a slow disk is no hang)
                return self.batches.put((slot, self.ring[slot]))

            # Small batches are cut by this thread: a hop through the pool (two wake-ups, the
            # GIL handed back and forth) would cost more than the copy. So are all batches where
            # the pool has two threads or fewer: on two cores the hop cost more than a second
            # copying thread gained (12 KiB rows, 3 MiB batches, against h5py's large reads in
            # one process, passes alternating: contiguous 0.74 -> 0.88, auto chunks 0.66 -> 0.80;
            # windows are still decoded by the reader's pool, so gzip kept its 1.2-1.3).
            inline = self.workers <= INLINE_WORKERS or (not direct and self.batch_bytes < INLINE_BATCH_BYTES)
            # A large batch cut here is cut by two threads, this one and an idle assembler, half
            # each, so both cores copy (same measure, passes alternating: contiguous 0.90 -> 1.14,
            # row chunks 1.05 -> 1.18, auto chunks 0.70 -> 0.76), and two batches at a time, so
            # that the hop (two wake-ups) is paid once for both (on a just-written file, h5py at
            # 15-16 GB/s: contiguous 0.78 -> 0.85, 0.84 -> 0.87, 0.84 -> 0.86; groups of 3 and 4
            # did no better, they cycle more slots through the cache).
            share = inline and self.workers > 1 and self.batch_bytes >= INLINE_BATCH_BYTES
            group: list = []  # batches taken a slot for, to be cut together
            pending = fill(0) if windows else None
            skip = self.skip_rows
            for n, w in enumerate(windows):
                assert pending is not None
                while inflight and not pending.done():  # the consumer gets batches while it waits
                    if not hand_on():
                        return
                t = clock()
                pending.wait()
                spent["window_wait"] += clock() - t
                watchdog.progress()
                if n + 1 < len(windows):
                    pending = fill(n + 1)
                # The preads of every batch of the window, worked out at once (numpy, not a loop).
                runs = []
                if direct:
                    rows_at = np.concatenate([np.arange(a, z) for a, z in w.ranges])[w.order[skip:]]
                    runs = [reader.row_segments(k, rows_at, self.batch) if k in mapped
                            else reader.row_runs(k, rows_at, self.batch) for k in direct]
                if mapped:
                    reader.unmap_pages()  # resident memory: about the window's pages, not the file's
                for b, s in enumerate(range(skip, w.rows, self.batch)):
                    # Each assembler has a batch queued behind the one it assembles, so it never
                    # waits for this thread (a wake-up on a busy machine costs milliseconds); no
                    # more, so that few slots cycle and stay in the CPU's cache. Batches go on in order.
                    while inflight and (inflight[0][0].done() or self.free_slots.empty()
                                        or len(inflight) >= QUEUED_PER_WORKER * self.workers):
                        if not hand_on():
                            return
                    t = clock()
                    slot = _get(self.free_slots, self.stop)
                    if slot is _DONE:
                        return
                    ev = self.ring_events[slot]
                    if ev is not None:
                        ev.synchronize()  # its last copy to the device has finished
                    spent["slot_wait"] += clock() - t
                    idx = w.order[s:s + self.batch]
                    batch_runs = [r[b] for r in runs]
                    if share:
                        group.append((slot, idx, batch_runs))
                        # The group is cut once full, at the window's end (its buffer is then
                        # refilled), or when no slot is free (the consumer needs batches first).
                        if len(group) < SHARED_GROUP and s + self.batch < w.rows and not self.free_slots.empty():
                            continue
                        assemble_shared(group, n)
                        for slot_of, _, _ in group:
                            cut[n % 2].append(_ASSEMBLED)
                            inflight.append((_ASSEMBLED, slot_of))
                        group = []
                        continue
                    if inline:
                        assemble(slot, n, idx, batch_runs)
                        done = _ASSEMBLED
                    else:
                        done = assembler.submit(assemble, slot, n, idx, batch_runs)
                    cut[n % 2].append(done)
                    inflight.append((done, slot))
                skip = 0
            while inflight:
                if not hand_on():
                    return
        self.batches.put(_DONE)

    def __iter__(self) -> Iterator[tuple[int, dict]]:
        while True:
            t = time.perf_counter()
            item = self.batches.get()
            self.spent["consumer_wait"] += time.perf_counter() - t
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item

    def release(self, slot: int, event: Optional[torch.cuda.Event] = None) -> None:
        """The consumer is done with this slot's batch; on CUDA, once `event` (its copy) has passed."""
        self.ring_events[slot] = event
        self.free_slots.put(slot)

    def close(self) -> None:
        self.stop.set()
        with watchdog.phase("data", "the loader's reads still in flight, at the end of a pass", reads=True):
            self.thread.join(timeout=10)


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype)).dtype


def _coalesce(ranges) -> list[tuple[int, int]]:
    """Merge touching ranges so each read is as large as it can be."""
    out: list[tuple[int, int]] = []
    for a, b in ranges:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


class _Masks:
    """The evaluation mask of each batch in turn: True for real rows, False for padding."""

    def __init__(self, batch: int, plan: RankPlan, device: torch.device, start_step: int):
        assert plan.valid is not None  # an evaluation plan
        self.batch, self.valid, self.step = batch, plan.valid, start_step
        self.arange = torch.arange(batch, device=device)

    def next(self) -> torch.Tensor:  # a fresh tensor each time: the consumer may change it in place
        left = self.valid - self.step * self.batch
        self.step += 1
        return self.arange < left


class ShardedLoader:
    """This rank's batches of `source`, a fresh disjoint shard and order every epoch.

        loader = ShardedLoader(src, world, batch_size=64, seed=0)
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            for x, y in loader: ...

    shuffle: "block" (chunk-aligned blocks in a global random order, rows shuffled within a
    window — reads stay large), "exact" (one global per-row permutation, reads scattered),
    or "none". drop_last=False pads the last batches by repeating rows instead.
    evaluation=True: every row exactly once across ranks, in file order (rank r reads the r-th
    contiguous share); every rank runs the same number of full batches, so collectives per
    batch stay matched, and each batch ends with a bool `mask` tensor marking its real rows
    (padding repeats real rows and must be left out: `loss[mask].sum()`, `mask.sum()`).
    `len(loader)` is that number of batches, `loader.samples` this rank's real rows. Real rows
    come first: batch i holds min(batch, samples - i·batch) of them (≥ 0), so a consumer on
    CUDA can count or slice them on the host without reading the mask back.
    A batch is a tuple of tensors in `source.keys` order, on `device` (default world.device),
    passed through `transform` when given. On CPU, a batch's tensors share memory with the
    loader's buffers and stay valid until the next batch is requested: `.clone()` one to keep
    it longer (on CUDA each batch is a fresh device tensor). stage_dir: copy this rank's rows there once and
    read them from there in later epochs (the rank then keeps its rows across epochs and
    reshuffles them locally); one process per node copies, for every rank on it, into a private
    folder under stage_dir (`auto`, environment variables and ~ allowed: see staging.py).
    `close()` removes this rank's staged file (a normal exit does too).
    """

    def __init__(self, source: H5Source, world, batch_size: int, seed: int = 0, shuffle: str = "block",
                 drop_last: bool = True, prefetch: int = 4, device: Optional[str] = None,
                 transform: Optional[Callable[[tuple], tuple]] = None, stage_dir: Optional[str] = None,
                 block: Optional[int] = None, window: Optional[int] = None, workers: Optional[int] = None,
                 evaluation: bool = False):
        self.world = world
        self.source = source
        world.agree(source.validate)
        rows = len(source)
        self.evaluation = evaluation
        if evaluation:
            if stage_dir is not None:
                raise BadInput("an evaluation loader reads its rows once: stage_dir does not apply")
            shuffle = "none"
            if batch_size < 1:
                raise BadInput(f"batch size must be >= 1, got {batch_size}")
        else:
            world.agree(lambda: check_shape(rows, world.size, batch_size, shuffle))
        if prefetch < 1:
            raise BadInput(f"prefetch must be >= 1, got {prefetch}")
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self.prefetch = prefetch
        self.device = torch.device(device or world.device)
        self.transform = transform
        # At least ~256 blocks, so that shards change from epoch to epoch even on small data.
        if block is None:
            chunk = max((lay.chunk_rows or 1) for lay in source.layouts)
            block = min(source.suggested_block(), -(-rows // 256))
            block = max(chunk, block // chunk * chunk)  # whole chunks: each is decompressed once
        self.block = block
        # Large rows move in runs of `group` rows (~RUN_BYTES) where that makes them cheap to
        # cut: rows copied straight into batches from the file (see the module doc), and rows
        # gathered from chunks that cut them into pieces, where a run's pieces of one chunk lie
        # side by side (12 KiB rows in h5py's auto chunks of (1563, 24): a batch gathers 2,048
        # stretches of 1.5 KiB, not 32,768 pieces of 96 B; one process against h5py's large
        # reads, passes alternating: 0.88 -> 1.04).
        big = max(source.row_bytes_of(k) for k in source.keys)
        large = [k for k in source.keys if source.row_bytes_of(k) >= DIRECT_ROW_BYTES]
        direct = bool(large) and all(source.row_addressable(k) for k in large)
        grouped = direct or (bool(large) and all(source.column_chunked(k) for k in large))
        self.group = max(1, min(batch_size // 16, -(-RUN_BYTES // big))) if grouped else 1
        # The window is the shuffle buffer. Rows read directly never sit in it, so it can span
        # more blocks for free; otherwise it holds whole rows and stays a few blocks large.
        self.window = window or max((16 if direct else 4) * self.block, 4 * batch_size)
        self.workers = workers or default_workers(world)
        self.stage_dir = stage_dir
        self.staging: Optional[Staging] = None
        if stage_dir is not None:
            self.staging = Staging(stage_dir, source, world, batch_size, seed, self.block, self.window, shuffle)
        self.epoch, self.start_step = 0, 0
        self._pipe: Optional[_Pipeline] = None
        self.spent: dict[str, float] = {}  # the last pass's reader-thread time, by where it went

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch's shard and order; start_step skips that many batches (resume)."""
        if not 0 <= start_step <= len(self):
            raise BadInput(f"start_step {start_step} outside 0..{len(self)}")
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        if self.evaluation:
            return eval_steps(len(self.source), self.world.size, self.batch_size)
        return steps_per_epoch(len(self.source), self.world.size, self.batch_size, self.drop_last)

    @property
    def samples(self) -> int:
        """Real rows this rank yields in one pass (evaluation: its share; else every row it reads)."""
        plan = self.plan()
        return plan.rows if plan.valid is None else plan.valid

    def plan(self, epoch: Optional[int] = None) -> RankPlan:
        """This rank's plan for `epoch` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        if self.evaluation:
            return plan_eval(len(self.source), self.world.size, self.world.rank, self.batch_size, window=self.window)
        if self.staging is not None:
            staged = self.staging.share()
            return plan_rank(len(staged), 1, 0, self.batch_size, self.seed, epoch, block=self.block,
                             window=self.window, drop_last=True, shuffle=self.shuffle, group=self.group)
        return plan_rank(len(self.source), self.world.size, self.world.rank, self.batch_size, self.seed, epoch,
                         block=self.block, window=self.window, drop_last=self.drop_last, shuffle=self.shuffle,
                         group=self.group)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        plan = self.plan()
        source = self.staging.share() if self.staging is not None else self.source
        cuda = self.device.type == "cuda"
        pipe = _Pipeline(source, plan, self.start_step, self.prefetch, pinned=cuda, workers=self.workers)
        self._pipe = pipe
        # On CUDA batches are copied on a stream of their own, so that the copy of the next batch
        # overlaps the device's work on this one instead of queueing behind it on the compute stream.
        copier = torch.cuda.Stream(self.device) if cuda and os.environ.get("MPIDL_COPY_STREAM", "1") != "0" else None
        held: Optional[int] = None
        masks = _Masks(self.batch_size, plan, self.device, self.start_step) if plan.valid is not None else None
        try:
            for slot, arrays in pipe:
                if held is not None:
                    pipe.release(held)
                    held = None
                if cuda:
                    compute = torch.cuda.current_stream(self.device)
                    with torch.cuda.stream(copier if copier is not None else compute):
                        batch = tuple(arrays[k].to(self.device, non_blocking=True) for k in source.keys)
                        ev = torch.cuda.Event(blocking=True)  # the reader thread sleeps on it, not spins
                        ev.record()
                    if copier is not None:
                        compute.wait_event(ev)  # the consumer's work on the batch waits for its copy
                        for t in batch:  # and its memory is not reused before that work is done
                            t.record_stream(compute)
                    pipe.release(slot, ev)  # reusable once the copy has passed; the reader waits on it
                else:
                    batch = tuple(arrays[k] for k in source.keys)
                    held = slot
                if self.transform is not None:
                    batch = self.transform(batch)
                if masks is not None:
                    batch = (*batch, masks.next())
                yield batch
        finally:
            pipe.close()
            self.spent = dict(pipe.spent)
            self._pipe = None
        self.start_step = 0  # a later pass over the same epoch starts at its beginning

    @property
    def staged_path(self) -> Optional[Path]:
        """This rank's staged file once staged (the first pass or plan()), else None."""
        if self.staging is None or self.staging.staged is None:
            return None
        return self.staging.path(self.world.rank)

    def close(self) -> None:
        """Stop reading and remove this rank's staged file; the loader is not used after this.

        Not a collective: each rank removes only its own file, which no other rank reads.
        """
        if self._pipe is not None:
            self._pipe.close()
        if self.staging is not None:
            self.staging.remove()
