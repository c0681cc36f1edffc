"""Scans of a whole source, shared out across ranks: label range, labels out of range, non-finite values.

Each rank reads one contiguous share of the rows (block by block, chunks decoded on its
threads) and one small MPI reduction combines the answers, so every rank ends with the same
result and a scan costs one read of the dataset divided by the ranks. Errors are raised on
every rank alike (`BadInput`, one line naming file, dataset, row and value).

    lo, hi = label_range(src, world, "y")               # e.g. to infer the class count: hi + 1
    check_labels(src, world, "y", classes=10)           # BadInput naming the first offending row
    count, first = nonfinite(src, world, "x")
    check_finite(src, world, "y", "target")             # BadInput naming the first NaN or Inf
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np

from mpidl.data.layout import H5Source
from mpidl.data.source import default_workers
from mpidl.errors import BadInput

_NONE = np.iinfo(np.int64).max  # "no row found" in a MIN reduction


@dataclass(frozen=True)
class Where:
    """A row of a source, as a user finds it: the file, the dataset, the row in that file."""

    path: str
    key: str
    row: int  # in the file

    def __str__(self) -> str:
        return f"{self.path}: dataset '{self.key}' row {self.row}"


def locate(source: H5Source, row: int, key: str) -> Where:
    """Where source row `row` (the source's own numbering) lives."""
    at = row + (source.row_range[0] if source.row_range else 0)
    for lay in source.layouts:
        if at < lay.rows:
            return Where(lay.path, key, at)
        at -= lay.rows
    raise IndexError(f"row {row} outside the source's {len(source)} rows")


def _blocks(source: H5Source, world, key: str) -> Iterator[tuple[int, np.ndarray]]:
    """(first source row, rows) of this rank's contiguous share, a block at a time."""
    n = len(source)
    lo, hi = n * world.rank // world.size, n * (world.rank + 1) // world.size
    block = source.suggested_block()
    buf = np.empty((min(block, max(1, hi - lo)), *source.shapes[key]), source.dtypes[key])
    with source.open(workers=default_workers(world)) as reader:
        for a in range(lo, hi, block):
            b = min(hi, a + block)
            reader.read(key, a, b, buf[:b - a])
            yield a, buf[:b - a]


def _reduce(world, local: np.ndarray, op: str) -> np.ndarray:
    if world.size == 1 or world.comm is None:
        return local
    from mpi4py import MPI

    out = np.empty_like(local)
    world.comm.Allreduce(local, out, op={"min": MPI.MIN, "max": MPI.MAX, "sum": MPI.SUM}[op])
    return out


def _need(source: H5Source, world, key: str, kinds: str, what: str) -> None:
    world.agree(source.validate)
    if key not in source.keys:
        raise BadInput(f"{what}: '{key}' is not among the source keys {list(source.keys)}")
    if source.dtypes[key].kind not in kinds:
        raise BadInput(f"{source.files[0]}: dataset '{key}' has dtype {source.dtypes[key]}, "
                       f"{what} needs {'integer' if kinds == 'iu' else 'float'} values")


def label_range(source: H5Source, world, key: str) -> tuple[int, int]:
    """(min, max) of integer dataset `key` over every row; each rank scans a share (collective)."""
    _need(source, world, key, "iu", "a label range")
    lo, hi = np.iinfo(np.int64).max, np.iinfo(np.int64).min
    for _, rows in _blocks(source, world, key):
        if rows.size:
            lo, hi = min(lo, int(rows.min())), max(hi, int(rows.max()))
    lo = int(_reduce(world, np.array([lo], np.int64), "min")[0])
    hi = int(_reduce(world, np.array([hi], np.int64), "max")[0])
    return lo, hi


def first_row(source: H5Source, world, key: str, bad: Callable[[np.ndarray], np.ndarray]
              ) -> tuple[int, Optional[Where], Optional[np.ndarray]]:
    """(count, where, row) for the values of `key` that `bad` flags (a bool per value): how
    many there are, where the first row holding one is, and that row (None, None when there is
    none). Collective: every rank gets the same answer."""
    n = len(source)
    count, first, value = 0, _NONE, None
    for a, rows in _blocks(source, world, key):
        flags = bad(rows)
        count += int(np.count_nonzero(flags))
        if first == _NONE:
            hit = np.flatnonzero(flags.reshape(flags.shape[0], -1).any(axis=1))
            if len(hit):
                first, value = a + int(hit[0]), rows[hit[0]].copy()
    count = int(_reduce(world, np.array([count], np.int64), "sum")[0])
    first = int(_reduce(world, np.array([first], np.int64), "min")[0])
    if first == _NONE:
        return count, None, None
    if world.size > 1:  # the row itself, from the rank whose share holds it
        owner = next(r for r in range(world.size) if n * r // world.size <= first < n * (r + 1) // world.size)
        value = world.comm.bcast(value, root=owner)
    return count, locate(source, first, key), value


def check_labels(source: H5Source, world, key: str, classes: int) -> tuple[int, int]:
    """BadInput (on every rank) when a label of `key` lies outside [0, classes); else the range.

    Costs one scan of the labels when they are all in range, two when one is not.
    """
    lo, hi = label_range(source, world, key)
    if lo < 0 or hi >= classes:
        count, where, value = first_row(source, world, key, lambda y: (y < 0) | (y >= classes))
        assert value is not None  # the range says a label lies outside, so the scan finds its row
        raise BadInput(f"{where} holds label {int(np.ravel(value)[0])}, outside [0, {classes}) for {classes} "
                       f"classes ({count} such labels; they range {lo}..{hi})", collective=world.size > 1)
    return lo, hi


def check_finite(source: H5Source, world, key: str, what: str = "value") -> None:
    """BadInput (on every rank) naming the first row of float dataset `key` that holds NaN or Inf."""
    _need(source, world, key, "f", "a non-finite scan")
    count, where, row = first_row(source, world, key, lambda v: ~np.isfinite(v))
    if where is not None:
        assert row is not None  # where and row are found together
        v = np.ravel(row)
        raise BadInput(f"{where} holds {v[~np.isfinite(v)][0]}: the data holds {count} non-finite "
                       f"{what}{'s' if count != 1 else ''}", collective=world.size > 1)


def nonfinite(source: H5Source, world, key: str) -> tuple[int, Optional[Where]]:
    """(NaN and infinite values, the first row holding one) in float dataset `key`. Collective."""
    _need(source, world, key, "f", "a non-finite scan")
    count, where, _ = first_row(source, world, key, lambda x: ~np.isfinite(x))
    return count, where
