"""ShardedLoader: this rank's rows of an HDF5 source, reshuffled per epoch, prefetched.

Two background threads form the pipeline, so reading and shuffling overlap each other
and the model's compute:

    reader   window ranges --read_direct--> window buffer (2 buffers, reused)
    batcher  window buffer --np.take(order)--> batch arrays --queue(prefetch)--> consumer

Memory is bounded by two windows plus `prefetch` batches, whatever the dataset's size.
On CUDA the batcher writes into a ring of pinned buffers and the consumer copies them to
the device with non_blocking=True; a buffer is reused only after its copy has finished.
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


class _Pipeline:
    """The reader and batcher threads of one pass over a RankPlan."""

    def __init__(self, source: H5Source, plan: RankPlan, start_step: int, prefetch: int, pinned: bool):
        self.source, self.plan = source, plan
        self.keys = source.keys
        self.shapes, self.dtypes = source.shapes, source.dtypes
        self.batch = plan.batch
        self.stop = threading.Event()
        self.windows: queue.Queue = queue.Queue()
        self.free: queue.Queue = queue.Queue()
        self.batches: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        max_rows = max((w.rows for w in plan.windows), default=0)
        for _ in range(2):
            self.free.put({k: np.empty((max_rows, *self.shapes[k]), self.dtypes[k]) for k in self.keys})
        self.pinned = pinned
        self.ring: list[dict[str, torch.Tensor]] = []
        self.ring_events: list[Optional[torch.cuda.Event]] = []
        if pinned:
            for _ in range(prefetch + 2):
                self.ring.append({k: torch.empty((self.batch, *self.shapes[k]),
                                                 dtype=torch.from_numpy(np.empty(0, self.dtypes[k])).dtype,
                                                 pin_memory=True) for k in self.keys})
                self.ring_events.append(None)
        # Skip whole windows before start_step; the batcher skips the rest inside the first one.
        first, skip = 0, start_step * self.batch
        while first < len(plan.windows) and skip >= plan.windows[first].rows:
            skip -= plan.windows[first].rows
            first += 1
        self.first_window, self.skip_rows = first, skip
        self.threads = [threading.Thread(target=self._guard, args=(self._read,), daemon=True, name="mpidl-reader"),
                        threading.Thread(target=self._guard, args=(self._gather,), daemon=True, name="mpidl-batcher")]
        for t in self.threads:
            t.start()

    def _guard(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as e:  # handed to the consumer, which raises it in its own thread
            _put(self.batches, _Failed(e), self.stop)
            self.stop.set()

    def _read(self) -> None:
        with self.source.open() as reader:
            for w in self.plan.windows[self.first_window:]:
                buf = _get(self.free, self.stop)
                if buf is _DONE:
                    return
                pos = 0
                for a, b in _coalesce(w.ranges):
                    for k in self.keys:
                        reader.read(k, a, b, buf[k][pos:pos + b - a])
                    pos += b - a
                if not _put(self.windows, (w, buf), self.stop):
                    return
        _put(self.windows, _DONE, self.stop)

    def _gather(self) -> None:
        skip, slot = self.skip_rows, 0
        while True:
            item = _get(self.windows, self.stop)
            if item is _DONE:
                break
            w, buf = item
            order = w.order
            for s in range(skip, w.rows, self.batch):
                idx = order[s:s + self.batch]
                if self.pinned:
                    ev = self.ring_events[slot]
                    if ev is not None:
                        ev.synchronize()  # its last copy to the device has finished
                    out = self.ring[slot]
                    for k in self.keys:
                        np.take(buf[k], idx, axis=0, out=out[k].numpy())
                    item_out: Any = (slot, out)
                    slot = (slot + 1) % len(self.ring)
                else:
                    item_out = (None, {k: np.take(buf[k], idx, axis=0) for k in self.keys})
                if not _put(self.batches, item_out, self.stop):
                    return
            skip = 0
            self.free.put(buf)
        _put(self.batches, _DONE, self.stop)

    def __iter__(self) -> Iterator[tuple[Optional[int], dict]]:
        while True:
            item = _get(self.batches, self.stop)
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=10)


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
    passed through `transform` when given. stage_dir: copy this rank's rows there once and
    read them from there in later epochs (the rank then keeps its rows across epochs and
    reshuffles them locally).
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
        self.block = block or max(1, min(source.suggested_block(), -(-rows // 256)))
        self.window = window or max(4 * self.block, 4 * batch_size)
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
                             window=self.window, drop_last=True, shuffle=self.shuffle)
        return plan_rank(len(self.source), self.world.size, self.world.rank, self.batch_size, self.seed, epoch,
                         block=self.block, window=self.window, drop_last=self.drop_last, shuffle=self.shuffle)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        plan = self.plan()
        source = self._staged if self.stage_dir is not None else self.source
        assert source is not None
        cuda = self.device.type == "cuda"
        pipe = _Pipeline(source, plan, self.start_step, self.prefetch, pinned=cuda)
        self._pipe = pipe
        stream = torch.cuda.current_stream(self.device) if cuda else None
        try:
            for slot, arrays in pipe:
                if cuda:
                    batch = tuple(arrays[k].to(self.device, non_blocking=True) for k in source.keys)
                    ev = torch.cuda.Event()
                    ev.record(stream)
                    pipe.ring_events[slot] = ev
                else:
                    batch = tuple(torch.from_numpy(arrays[k]) for k in source.keys)
                if self.transform is not None:
                    batch = self.transform(batch)
                yield batch
        finally:
            pipe.close()
            self._pipe = None
        self.start_step = 0  # a later pass over the same epoch starts at its beginning

    # ------------------------------------------------------------------ staging
    def _stage(self) -> H5Source:
        """Copy this rank's fixed share of rows to stage_dir once (atomically) and return it."""
        if self._staged is not None:
            return self._staged
        import h5py

        src, w = self.source, self.world
        steps = steps_per_epoch(len(src), w.size, self.batch_size, drop_last=True)
        name = f"mpidl-stage-{src.signature()}-b{self.batch_size}-s{self.seed}-r{w.rank}of{w.size}.h5"
        path = Path(self.stage_dir) / name
        if not path.exists():
            Path(self.stage_dir).mkdir(parents=True, exist_ok=True)
            # The share: this rank's rows of a seed-only block order, read once from the source.
            share = plan_rank(len(src), w.size, w.rank, self.batch_size, self.seed, _STAGE_EPOCH, block=self.block,
                              window=self.window, drop_last=True, shuffle="block" if self.shuffle != "none" else "none")
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            rows = steps * self.batch_size
            with src.open() as reader, h5py.File(tmp, "w") as out:
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
        self._staged = H5Source(str(path), keys=src.keys).validate()
        return self._staged
