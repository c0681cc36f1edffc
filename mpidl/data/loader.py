"""ShardedLoader: this rank's rows of an HDF5 source, reshuffled per epoch, prefetched.

One background reader thread fills a ring of reused batch buffers, `prefetch` batches
ahead of the consumer, so reading overlaps the model's compute. Per dataset key it takes
the cheaper of two paths:

    large rows (>= 4 KiB) of contiguous datasets: each batch's rows are read straight from
        the file into the batch buffer, one `pread` per run of consecutive rows (the plan
        moves rows in runs of a few, ~192 KiB each) — one copy, no HDF5 call per read;
    everything else (small rows, chunked or compressed data): the window's rows are read
        with a few large `read_direct` calls, then gathered into batches with np.take.

Memory is bounded by one window of small-row keys plus `prefetch + 2` batches, whatever the
dataset's size. On CUDA the ring is pinned and the consumer copies each batch to the device
with non_blocking=True; a buffer is reused only after its copy has finished.
"""
from __future__ import annotations

import os
import queue
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from mpidl.data.shard import RankPlan, check_shape, plan_rank, steps_per_epoch
from mpidl.data.source import H5Source
from mpidl.errors import BadInput

_DONE = object()
_STAGE_EPOCH = 2**32 - 1  # the seed-only order that picks each rank's staged share


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Put unless asked to stop; False when stopped."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


def _get(q: queue.Queue, stop: threading.Event) -> Any:
    while not stop.is_set():
        try:
            return q.get(timeout=0.05)
        except queue.Empty:
            continue
    return _DONE


DIRECT_ROW_BYTES = 4096  # rows at least this large are read straight into their batch slot
RUN_BYTES = 192 << 10    # target bytes per direct read: amortises the call, keeps batches mixed


class _Pipeline:
    """The reader thread of one pass over a RankPlan, and the ring of batch buffers it fills."""

    def __init__(self, source: H5Source, plan: RankPlan, start_step: int, prefetch: int, pinned: bool):
        self.source, self.plan = source, plan
        self.keys = source.keys
        self.shapes, self.dtypes = source.shapes, source.dtypes
        self.batch = plan.batch
        self.stop = threading.Event()
        self.batches: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        # Batches are written into a ring of reused buffers: fresh arrays per batch would cost
        # a page fault per 4 KiB and halve throughput. A slot is free again once the consumer
        # has asked for the batch after it (and, on CUDA, once its copy to the device is done).
        self.pinned = pinned
        self.ring: list[dict[str, Any]] = []
        for _ in range(prefetch + 2):
            if pinned:
                self.ring.append({k: torch.empty((self.batch, *self.shapes[k]), dtype=_torch_dtype(self.dtypes[k]),
                                                 pin_memory=True) for k in self.keys})
            else:
                self.ring.append({k: torch.from_numpy(np.empty((self.batch, *self.shapes[k]), self.dtypes[k]))
                                  for k in self.keys})
        self.ring_events: list[Optional[torch.cuda.Event]] = [None] * len(self.ring)
        self.free_slots: queue.Queue = queue.Queue()
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

    def _guard(self) -> None:
        try:
            self._read()
        except BaseException as e:  # handed to the consumer, which raises it in its own thread
            _put(self.batches, _Failed(e), self.stop)

    def _read(self) -> None:
        src = self.source
        with src.open() as reader:
            direct = [k for k in self.keys if src.row_bytes_of(k) >= DIRECT_ROW_BYTES and reader.byte_addressable(k)]
            windowed = [k for k in self.keys if k not in direct]
            max_rows = max((w.rows for w in self.plan.windows), default=0)
            buf = {k: np.empty((max_rows, *self.shapes[k]), self.dtypes[k]) for k in windowed}
            skip = self.skip_rows
            for w in self.plan.windows[self.first_window:]:
                pos = 0
                starts = []
                for a, b in _coalesce(w.ranges):
                    for k in windowed:
                        reader.read(k, a, b, buf[k][pos:pos + b - a])
                    starts.append((pos, a))
                    pos += b - a
                if direct:  # window position -> source row
                    rows_at = np.concatenate([np.arange(a, a + n) for (p, a), n in
                                              zip(starts, np.diff([p for p, _ in starts] + [pos]))])
                for s in range(skip, w.rows, self.batch):
                    idx = w.order[s:s + self.batch]
                    slot = _get(self.free_slots, self.stop)
                    if slot is _DONE:
                        return
                    ev = self.ring_events[slot]
                    if ev is not None:
                        ev.synchronize()  # its last copy to the device has finished
                    out = self.ring[slot]
                    for k in windowed:
                        np.take(buf[k], idx, axis=0, out=out[k].numpy())
                    for k in direct:
                        reader.read_rows(k, rows_at[idx], out[k].numpy())
                    if not _put(self.batches, (slot, out), self.stop):
                        return
                skip = 0
        _put(self.batches, _DONE, self.stop)

    def __iter__(self) -> Iterator[tuple[int, dict]]:
        while True:
            item = _get(self.batches, self.stop)
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item

    def release(self, slot: int) -> None:
        """The consumer is done with this slot's batch (on CUDA: once its copy completes)."""
        self.free_slots.put(slot)

    def close(self) -> None:
        self.stop.set()
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


class ShardedLoader:
    """This rank's batches of `source`, a fresh disjoint shard and order every epoch.

        loader = ShardedLoader(src, world, batch_size=64, seed=0)
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            for x, y in loader: ...

    shuffle: "block" (chunk-aligned blocks in a global random order, rows shuffled within a
    window — reads stay large), "exact" (one global per-row permutation, reads scattered),
    or "none". drop_last=False pads the last batches by repeating rows instead.
    A batch is a tuple of tensors in `source.keys` order, on `device` (default world.device),
    passed through `transform` when given. On CPU, a batch's tensors share memory with the
    loader's buffers and stay valid until the next batch is requested: `.clone()` one to keep
    it longer (on CUDA each batch is a fresh device tensor). stage_dir: copy this rank's rows there once and
    read them from there in later epochs (the rank then keeps its rows across epochs and
    reshuffles them locally); one process per node copies, for every rank on it.
    """

    def __init__(self, source: H5Source, world, batch_size: int, seed: int = 0, shuffle: str = "block",
                 drop_last: bool = True, prefetch: int = 4, device: Optional[str] = None,
                 transform: Optional[Callable[[tuple], tuple]] = None, stage_dir: Optional[str] = None,
                 block: Optional[int] = None, window: Optional[int] = None):
        self.world = world
        self.source = source
        world.agree(source.validate)
        rows = len(source)
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
        # Large rows are read straight into batches in runs of `group` rows (see the module doc).
        big = max(source.row_bytes_of(k) for k in source.keys)
        direct = big >= DIRECT_ROW_BYTES and all(lay.chunk_rows is None and lay.compression is None
                                                 for lay in source.layouts)
        self.group = max(1, min(batch_size // 16, -(-RUN_BYTES // big))) if direct else 1
        # The window is the shuffle buffer. Rows read directly never sit in it, so it can span
        # more blocks for free; otherwise it holds whole rows and stays a few blocks large.
        self.window = window or max((16 if direct else 4) * self.block, 4 * batch_size)
        self.stage_dir = stage_dir
        self._staged: Optional[H5Source] = None
        self.epoch, self.start_step = 0, 0
        self._pipe: Optional[_Pipeline] = None

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch's shard and order; start_step skips that many batches (resume)."""
        if not 0 <= start_step <= len(self):
            raise BadInput(f"start_step {start_step} outside 0..{len(self)}")
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return steps_per_epoch(len(self.source), self.world.size, self.batch_size, self.drop_last)

    def plan(self, epoch: Optional[int] = None) -> RankPlan:
        """This rank's plan for `epoch` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        if self.stage_dir is not None:
            staged = self._stage()
            return plan_rank(len(staged), 1, 0, self.batch_size, self.seed, epoch, block=self.block,
                             window=self.window, drop_last=True, shuffle=self.shuffle, group=self.group)
        return plan_rank(len(self.source), self.world.size, self.world.rank, self.batch_size, self.seed, epoch,
                         block=self.block, window=self.window, drop_last=self.drop_last, shuffle=self.shuffle,
                         group=self.group)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        plan = self.plan()
        source = self._staged if self.stage_dir is not None else self.source
        assert source is not None
        cuda = self.device.type == "cuda"
        pipe = _Pipeline(source, plan, self.start_step, self.prefetch, pinned=cuda)
        self._pipe = pipe
        stream = torch.cuda.current_stream(self.device) if cuda else None
        held: Optional[int] = None
        try:
            for slot, arrays in pipe:
                if held is not None:
                    pipe.release(held)
                if cuda:
                    batch = tuple(arrays[k].to(self.device, non_blocking=True) for k in source.keys)
                    ev = torch.cuda.Event()
                    ev.record(stream)
                    pipe.ring_events[slot] = ev
                    pipe.release(slot)  # reusable once the event has passed; the batcher waits on it
                else:
                    batch = tuple(arrays[k] for k in source.keys)
                    held = slot
                if self.transform is not None:
                    batch = self.transform(batch)
                yield batch
        finally:
            pipe.close()
            self._pipe = None
        self.start_step = 0  # a later pass over the same epoch starts at its beginning

    # ------------------------------------------------------------------ staging
    def _stage(self) -> H5Source:
        """This rank's fixed share of rows, copied to stage_dir once per node, and return it.

        The node's local rank 0 copies the share of every rank on its node (each to its own file,
        atomically) while the node's other ranks wait for it: the source is read by one process
        per node, and a node-local disk is written by one. A collective on the node.
        """
        if self._staged is not None:
            return self._staged
        src, w = self.source, self.world
        node = w.node_comm if w.local_size > 1 else None
        here = node.allgather(w.rank) if node is not None else [w.rank]
        if w.local_rank == 0:
            for rank in here:
                path = self._stage_path(rank)
                if not path.exists():
                    self._copy_share(rank, path)
        if node is not None:
            node.Barrier()
        self._staged = H5Source(str(self._stage_path(w.rank)), keys=src.keys).validate()
        return self._staged

    def _stage_path(self, rank: int) -> Path:
        name = (f"mpidl-stage-{self.source.signature()}-b{self.batch_size}-s{self.seed}"
                f"-r{rank}of{self.world.size}.h5")
        return Path(self.stage_dir) / name

    def _copy_share(self, rank: int, path: Path) -> None:
        import h5py

        src, w = self.source, self.world
        steps = steps_per_epoch(len(src), w.size, self.batch_size, drop_last=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        # The share: the rank's rows of a seed-only block order, read once from the source.
        share = plan_rank(len(src), w.size, rank, self.batch_size, self.seed, _STAGE_EPOCH, block=self.block,
                          window=self.window, drop_last=True, shuffle="block" if self.shuffle != "none" else "none")
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        rows = steps * self.batch_size
        with src.open() as reader, h5py.File(tmp, "w") as out:
            out.attrs["mpidl_staged_by"] = f"{w.host} rank {w.rank}"
            dsets = {k: out.create_dataset(k, (rows, *src.shapes[k]), src.dtypes[k]) for k in src.keys}
            pos = 0
            for win in share.windows:
                for a, b in _coalesce(win.ranges):
                    for k in src.keys:
                        part = np.empty((b - a, *src.shapes[k]), src.dtypes[k])
                        reader.read(k, a, b, part)
                        dsets[k][pos:pos + b - a] = part
                    pos += b - a
        os.replace(tmp, path)
