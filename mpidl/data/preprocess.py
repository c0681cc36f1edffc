"""Preprocessing on the device: uint8 scaling, standardization, random crop and flip.

Standardization statistics cover the whole dataset: each rank sums its contiguous share of
rows in float64 and one MPI Allreduce combines them; rank 0 caches the result beside the
data (or in `cache_dir`) so later runs skip the pass.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from mpidl.data.layout import H5Source
from mpidl.errors import BadInput


def scale_uint8(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [0, 255] -> float [0, 1]."""
    return x.to(dtype).mul_(1.0 / 255.0)


def _reduce_axes(shape: tuple[int, ...], per: str) -> tuple[int, ...]:
    """Axes of a batch (rows first) that statistics are taken over."""
    if per == "feature":
        return (0,)
    if per == "channel":
        if len(shape) < 2:
            raise BadInput(f"per-channel statistics need rows of rank >= 2 (C, ...); rows have shape {shape}")
        return (0, *range(2, len(shape) + 1))
    raise BadInput(f"standardize per must be 'feature' or 'channel', got {per!r}")


class Standardizer:
    """x -> (x - mean) / std with statistics over every row of the source."""

    def __init__(self, mean: np.ndarray, std: np.ndarray, per: str):
        self.mean, self.std, self.per = mean, std, per
        self._dev: dict = {}

    @classmethod
    def fit(cls, source: H5Source, world, key: str = "x", per: str = "feature",
            cache_dir: Optional[str] = None, block_rows: Optional[int] = None) -> "Standardizer":
        """Statistics of `key` over the whole source: each rank its share, one Allreduce."""
        world.agree(source.validate)
        if key not in source.keys:
            raise BadInput(f"standardize key '{key}' is not among the source keys {list(source.keys)}")
        shape = source.shapes[key]
        axes = _reduce_axes(shape, per)
        stat_shape = shape if per == "feature" else shape[:1]
        cache = _cache_path(source, key, per, cache_dir)
        found = world.comm.bcast(cache.exists() if world.rank == 0 else None, root=0) if world.size > 1 \
            else cache.exists()
        if found:
            arrays = None
            if world.rank == 0:
                with np.load(cache) as z:
                    arrays = (z["mean"], z["std"])
            if world.size > 1:
                arrays = world.comm.bcast(arrays, root=0)
            assert arrays is not None  # read by rank 0, which sent it to the others
            mean, std = arrays
            return cls(mean, std, per)

        n = len(source)
        lo, hi = n * world.rank // world.size, n * (world.rank + 1) // world.size
        block = block_rows or source.suggested_block()
        size = int(np.prod(stat_shape, dtype=np.int64))
        acc = np.zeros(1 + 2 * size, np.float64)  # count, sum, sum of squares: one Allreduce
        buf = np.empty((min(block, max(1, hi - lo)), *shape), source.dtypes[key])
        with source.open() as reader:
            for a in range(lo, hi, block):
                b = min(hi, a + block)
                part = buf[:b - a]
                reader.read(key, a, b, part)
                x = part.astype(np.float64)
                acc[0] += x.size / size
                acc[1:1 + size] += x.sum(axis=axes).ravel()
                acc[1 + size:] += np.square(x).sum(axis=axes).ravel()
        if world.size > 1:
            from mpi4py import MPI

            world.comm.Allreduce(MPI.IN_PLACE, acc, op=MPI.SUM)
        count = acc[0]
        mean = acc[1:1 + size] / count
        var = np.maximum(acc[1 + size:] / count - mean ** 2, 0.0)
        std = np.sqrt(var)
        std[std == 0] = 1.0  # constant features pass through centred, not divided by zero
        mean, std = mean.reshape(stat_shape), std.reshape(stat_shape)
        if world.rank == 0:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(cache.name + f".tmp{os.getpid()}.npz")
            np.savez(tmp, mean=mean, std=std)
            os.replace(tmp, cache)
        return cls(mean, std, per)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.device, x.ndim)
        if key not in self._dev:
            shape = (1, *self.mean.shape) if self.per == "feature" else \
                (1, self.mean.shape[0], *([1] * (x.ndim - 2)))
            self._dev[key] = (torch.as_tensor(self.mean, dtype=torch.float32, device=x.device).reshape(shape),
                              torch.as_tensor(self.std, dtype=torch.float32, device=x.device).reshape(shape))
        mean, std = self._dev[key]
        if not x.is_floating_point():
            x = x.float()
        return (x - mean) / std


def _cache_path(source: H5Source, key: str, per: str, cache_dir: Optional[str]) -> Path:
    folder = Path(cache_dir) if cache_dir else Path(source.files[0]).resolve().parent
    return folder / f".mpidl-stats-{source.signature()}-{key}-{per}.npz"


def _on(device: torch.device, host: torch.Tensor) -> torch.Tensor:
    """A small host tensor on `device` without stalling the host: copied from pinned memory
    asynchronously (a pageable copy would wait for the device to finish its queued work).
    The pinned block is not reused before the copy is done (PyTorch's pinned-memory cache
    records the copy's stream)."""
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def random_crop(x: torch.Tensor, size: int, padding: int = 0, generator: Optional[torch.Generator] = None
                ) -> torch.Tensor:
    """A random size×size crop of each image of an N×C×H×W batch (after zero padding).

    Offsets are drawn on the host (the same crops on every device for a seed) and reach the
    device without a synchronisation.
    """
    if padding:
        x = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    n, c, h, w = x.shape
    if size > h or size > w:
        raise BadInput(f"crop size {size} is larger than the images ({h}×{w} after padding {padding})")
    oy = torch.randint(0, h - size + 1, (n,), generator=generator)
    ox = torch.randint(0, w - size + 1, (n,), generator=generator)
    oy, ox = _on(x.device, torch.stack((oy, ox)))
    ar = torch.arange(size, device=x.device)
    rows = (oy[:, None] + ar)[:, None, :, None]
    cols = (ox[:, None] + ar)[:, None, None, :]
    bi = torch.arange(n, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return x[bi, ci, rows, cols]


def random_flip(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2 (drawn on the host, as for crops)."""
    mask = _on(x.device, torch.rand(x.shape[0], generator=generator).lt(0.5))
    return torch.where(mask[:, None, None, None], x.flip(-1), x)


class Pipeline:
    """The batch transform a job asks for: applied to the first tensor (inputs) of a batch.

    Order: standardization (of the stored values) or else uint8 scaling, crop, flip; labels
    pass through; then `then(x, y) -> (x, y)`, a job's own transform, where given. Random
    choices come from a generator seeded per rank, so a run is reproducible.
    """

    def __init__(self, scale_uint8: bool = False, standardizer: Optional[Standardizer] = None,
                 crop: Optional[int] = None, padding: int = 0, flip: bool = False, seed: int = 0, train: bool = True,
                 then: Optional[Callable[..., Sequence[torch.Tensor]]] = None):
        self.scale, self.standardizer = scale_uint8, standardizer
        self.crop, self.padding, self.flip, self.train = crop, padding, flip, train
        self.generator = torch.Generator().manual_seed(seed)
        self.then = then

    def __call__(self, batch: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        x, *rest = batch
        if self.standardizer is not None:  # statistics are of the stored values: it subsumes scaling
            x = self.standardizer(x)
        elif self.scale and x.dtype == torch.uint8:
            x = scale_uint8(x)
        if self.train and self.crop:
            x = random_crop(x, self.crop, self.padding, self.generator)
        elif self.crop and x.shape[-1] != self.crop:  # evaluation: the centre crop
            h, w = x.shape[-2:]
            t, l_ = (h - self.crop) // 2, (w - self.crop) // 2
            x = x[..., t:t + self.crop, l_:l_ + self.crop]
        if self.train and self.flip:
            x = random_flip(x, self.generator)
        if self.then is not None:
            return tuple(self.then(x, *rest))
        return (x, *rest)
