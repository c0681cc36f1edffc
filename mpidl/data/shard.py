"""Which rows each rank reads in an epoch, and in what order: the whole arithmetic, pure.

No MPI, no files: `plan_rank(rows, ranks, rank, batch, seed, epoch)` is a function of its
arguments alone, so every rank computes the same global picture independently and tests can
check it for any shape of job.

Block shuffle (the default) keeps reads large and contiguous:

1. cut the rows into blocks of `block` consecutive rows (chunk-aligned by the caller);
2. permute the blocks with a generator seeded by `(seed, epoch)` — one global order;
3. lay the permuted rows end to end and give rank r the r-th equal slice;
4. cut each rank's slice into windows of whole batches; a window is read with a few large
   contiguous reads and its rows are permuted in memory (seeded by `(seed, epoch, rank, window)`).

`exact` draws one global per-row permutation instead (reads become scattered: the reader
coalesces them, at a measured cost). `none` keeps file order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from mpidl.errors import BadInput

SHUFFLES = ("block", "exact", "none")


@dataclass(frozen=True)
class Window:
    """Rows read together: `ranges` in file order, then emitted in `order`."""

    ranges: tuple[tuple[int, int], ...]
    order: np.ndarray  # permutation of 0..rows-1 over the concatenated ranges

    @property
    def rows(self) -> int:
        return int(self.order.size)

    def indices(self) -> np.ndarray:
        """Global row ids in the order the loader yields them."""
        flat = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in self.ranges])
        return flat[self.order]


@dataclass(frozen=True)
class RankPlan:
    """One rank's epoch: `steps` batches of `batch` rows, in windows of whole batches.

    valid: how many of the rows, counted in the order they are yielded, are real; the rest
    pad the last batches (evaluation plans only; None: all rows are real).
    """

    rank: int
    batch: int
    steps: int
    windows: tuple[Window, ...]
    valid: Optional[int] = None

    @property
    def rows(self) -> int:
        return self.steps * self.batch

    def indices(self) -> np.ndarray:
        if not self.windows:
            return np.empty(0, dtype=np.int64)
        return np.concatenate([w.indices() for w in self.windows])


def steps_per_epoch(rows: int, ranks: int, batch: int, drop_last: bool = True) -> int:
    """Batches each rank runs per epoch; equal on every rank."""
    if drop_last:
        return rows // (ranks * batch)
    return -(-rows // (ranks * batch))


def check_shape(rows: int, ranks: int, batch: int, shuffle: str = "block") -> None:
    """BadInput for a job that cannot give every rank at least one full batch."""
    if batch < 1:
        raise BadInput(f"batch size must be >= 1, got {batch}")
    if ranks < 1:
        raise BadInput(f"ranks must be >= 1, got {ranks}")
    if shuffle not in SHUFFLES:
        raise BadInput(f"shuffle must be one of {', '.join(SHUFFLES)}; got {shuffle!r}")
    if rows < ranks * batch:
        raise BadInput(f"{rows} rows are fewer than ranks × batch = {ranks} × {batch} = {ranks * batch}: "
                       "use fewer ranks or a smaller batch")


def _runs(sorted_rows: np.ndarray) -> list[tuple[int, int]]:
    """Coalesce sorted row ids into [start, stop) runs."""
    if sorted_rows.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(sorted_rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [sorted_rows.size]])
    return [(int(sorted_rows[s]), int(sorted_rows[e - 1]) + 1) for s, e in zip(starts, stops)]


def _slice_of_blocks(order: np.ndarray, block: int, rows: int, lo: int, hi: int) -> list[tuple[int, int]]:
    """Rows [lo, hi) of the sequence 'blocks in `order`, laid end to end' as file ranges.

    Positions past the end wrap around (padding repeats the sequence's start).
    """
    sizes = np.minimum(block, rows - order * block)
    ends = np.cumsum(sizes)
    total = int(ends[-1])
    out: list[tuple[int, int]] = []
    pos = lo
    while pos < hi:
        p = pos % total
        i = int(np.searchsorted(ends, p, side="right"))
        start_in_seq = int(ends[i] - sizes[i])
        take = min(int(ends[i]) - p, hi - pos)
        first = int(order[i]) * block + (p - start_in_seq)
        if out and out[-1][1] == first:
            out[-1] = (out[-1][0], first + take)
        else:
            out.append((first, first + take))
        pos += take
    return out


def _split_ranges(ranges: Sequence[tuple[int, int]], counts: Sequence[int]) -> list[list[tuple[int, int]]]:
    """Cut a range list into consecutive pieces of `counts` rows each."""
    pieces: list[list[tuple[int, int]]] = []
    it = iter(ranges)
    cur = next(it, None)
    for want in counts:
        piece: list[tuple[int, int]] = []
        while want > 0 and cur is not None:
            a, b = cur
            take = min(b - a, want)
            piece.append((a, a + take))
            want -= take
            cur = (a + take, b) if a + take < b else next(it, None)
        pieces.append(piece)
    return pieces


def plan_rank(rows: int, ranks: int, rank: int, batch: int, seed: int, epoch: int, *,
              block: int = 4096, window: int = 16384, drop_last: bool = True,
              shuffle: str = "block", group: int = 1) -> RankPlan:
    """Rank `rank`'s rows for `epoch`, deterministic from the arguments alone.

    block: rows per contiguous read unit (align to the dataset's chunking);
    window: rows shuffled together in memory (rounded up to whole batches);
    group: block shuffle moves rows within a window in runs of `group` consecutive rows, so a
    loader can read large rows straight into their batch slot (1: every row on its own).
    """
    check_shape(rows, ranks, batch, shuffle)
    if not 0 <= rank < ranks:
        raise BadInput(f"rank {rank} outside 0..{ranks - 1}")
    block = max(1, int(block))
    steps = steps_per_epoch(rows, ranks, batch, drop_last)
    per_rank = steps * batch
    lo, hi = rank * per_rank, (rank + 1) * per_rank
    window_rows = max(batch, -(-int(window) // batch) * batch)
    counts = [min(window_rows, per_rank - s) for s in range(0, per_rank, window_rows)]

    windows: list[Window] = []
    if shuffle == "exact":
        perm = np.random.default_rng([seed, epoch]).permutation(rows)
        seq = np.resize(perm, ranks * per_rank)[lo:hi]  # resize repeats: padding wraps around
        offset = 0
        for n in counts:
            part = seq[offset:offset + n]
            offset += n
            srt = np.argsort(part, kind="stable")  # read in file order, emit in drawn order
            windows.append(Window(tuple(_runs(part[srt])), _emit_order(srt)))
        return RankPlan(rank, batch, steps, tuple(windows))

    n_blocks = -(-rows // block)
    if shuffle == "block":
        order = np.random.default_rng([seed, epoch]).permutation(n_blocks)
    else:
        order = np.arange(n_blocks)
    ranges = _slice_of_blocks(order, block, rows, lo, hi)
    for w, piece in enumerate(_split_ranges(ranges, counts)):
        n = sum(b - a for a, b in piece)
        if shuffle == "block":
            rng = np.random.default_rng([seed, epoch, rank, w])
            if group > 1:
                runs = rng.permutation(-(-n // group))
                emit = (runs[:, None] * group + np.arange(group)).ravel()
                emit = emit[emit < n]
            else:
                emit = rng.permutation(n)
        else:
            emit = np.arange(n)
        windows.append(Window(tuple(piece), emit))
    return RankPlan(rank, batch, steps, tuple(windows))


def _emit_order(srt: np.ndarray) -> np.ndarray:
    """Positions, in the sorted (read) layout, of the rows in their drawn order.

    Read layout row j holds drawn[srt[j]], so drawn row i sits at position inverse(srt)[i].
    Duplicates (from padding) stay distinct because srt is a permutation.
    """
    pos = np.empty_like(srt)
    pos[srt] = np.arange(srt.size)
    return pos


def plan_epoch(rows: int, ranks: int, batch: int, seed: int, epoch: int, **kw) -> list[RankPlan]:
    """Every rank's plan for `epoch` (see `plan_rank` for the keywords)."""
    return [plan_rank(rows, ranks, r, batch, seed, epoch, **kw) for r in range(ranks)]


def eval_steps(rows: int, ranks: int, batch: int) -> int:
    """Batches every rank runs in an evaluation pass: enough for the largest share."""
    return -(-(-(-rows // ranks)) // batch)  # noqa: B002 -- two ceiling divisions, not a decrement


def plan_eval(rows: int, ranks: int, rank: int, batch: int, *, window: int = 16384) -> RankPlan:
    """Rank `rank`'s evaluation pass: every row of the source exactly once across ranks.

    Rank r takes the contiguous share [r·rows/ranks, (r+1)·rows/ranks) (shares differ by at
    most one row) in file order, padded to `eval_steps` full batches by repeating its own
    rows (row 0 when its share is empty); `valid` says how many rows are real. Every rank
    runs the same number of batches of the same size, so a collective per batch is safe.
    """
    if batch < 1 or ranks < 1 or rows < 1:
        raise BadInput(f"evaluation needs rows, ranks and batch >= 1; got {rows}, {ranks}, {batch}")
    if not 0 <= rank < ranks:
        raise BadInput(f"rank {rank} outside 0..{ranks - 1}")
    steps = eval_steps(rows, ranks, batch)
    lo, hi = rows * rank // ranks, rows * (rank + 1) // ranks
    share = [(lo, hi)] if hi > lo else [(0, 1)]
    size = max(1, hi - lo)
    ranges = list(share)
    pad = steps * batch - (hi - lo)
    while pad > 0:  # repeat the share (or row 0) until the batches are full
        take = min(pad, size)
        ranges.append((share[0][0], share[0][0] + take))
        pad -= take
    if hi == lo:
        ranges = ranges[1:]  # an empty share is all padding
    per_rank = steps * batch
    window_rows = max(batch, -(-int(window) // batch) * batch)
    counts = [min(window_rows, per_rank - s) for s in range(0, per_rank, window_rows)]
    windows = tuple(Window(tuple(piece), np.arange(sum(b - a for a, b in piece)))
                    for piece in _split_ranges(ranges, counts))
    return RankPlan(rank, batch, steps, windows, valid=hi - lo)
