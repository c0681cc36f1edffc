"""The data a check runs on: a small slice of the job's real data, or a stand-in of its shapes.

- The files are readable: the first rows of every key, enough for the steps, into one
  temporary HDF5 file with each dataset's chunking and filters (the reader takes the job's
  path), plus the rows holding the smallest and largest label, so that the class count the
  trainer infers is the one the whole data gives. Before that the whole data goes through the
  trainer's own scans (labels against the class count, finite targets), naming file and row.
- They are not, and the spec has `data.synth`: the trainer writes the slice itself, with that
  generator and fewer rows.
- `--synthetic` (files that are large or remote: their metadata is read, no row), or shapes
  given as flags (`--shape x=3x32x32:uint8 --shape y=:int64`): random rows of those shapes
  and dtypes; integer labels in [0, classes).

Each case says in its note where the rows or shapes came from.
"""
from __future__ import annotations

import functools
import json
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from mpidl.errors import BadInput
from mpidl.spec import JobSpec


@dataclass
class Slice:
    sets: list[str]            # the --set items that point the job at it
    note: str                  # where its rows or shapes came from
    rows: int                  # rows of the training file
    shapes: dict = field(default_factory=dict)


def one_process():
    """A World of this process alone, without MPI: the scans of mpidl.data.scan take it."""
    from mpidl.world import World

    return World(rank=0, size=1, local_rank=0, local_size=1, host=socket.gethostname(), device="cpu",
                 launcher="single", comm=None)


def rows_needed(spec: JobSpec, ranks: int, steps_per_epoch: int) -> tuple[int, int]:
    """(rows of the file, of which training rows): `steps_per_epoch` full steps on `ranks`, and
    the spec's held-out fraction on top."""
    train = steps_per_epoch * spec.data.batch * spec.accumulate * ranks
    v = spec.data.val_fraction if spec.data.val_files is None else 0.0
    total = train
    while total - int(round(total * v)) < train:
        total += 1
    return total, train


def parse_shape(text: str) -> tuple[str, tuple[int, ...], np.dtype]:
    """`x=3x32x32:uint8` or `y=:int64` -> (key, shape of a row, dtype); BadInput otherwise."""
    key, eq, rest = text.partition("=")
    dims, colon, dtype = rest.partition(":")
    bad = BadInput(f"--shape {text!r}: expected KEY=DIMS:DTYPE, e.g. x=3x32x32:uint8 or y=:int64")
    try:
        shape = tuple(int(d) for d in dims.split("x")) if dims.strip() else ()
        dt = np.dtype(dtype.strip() or "float32")
    except (ValueError, TypeError):
        raise bad from None
    if not eq or not key.strip() or any(d < 1 for d in shape):
        raise bad
    return key.strip(), shape, dt


def _classes(spec: JobSpec, given: Optional[int]) -> Optional[int]:
    from mpidl.train.inputs import spec_classes

    return spec_classes(spec) or given


def _write_random(path: Path, rows: int, shapes: dict, classes: Optional[int], seed: int) -> None:
    import h5py

    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        for i, (key, (shape, dtype)) in enumerate(shapes.items()):
            if dtype.kind in "iu" and i == 1:  # labels
                if not classes:
                    raise BadInput(f"a stand-in for integer labels '{key}' needs a class count: --classes N "
                                   "(or model.args.num_classes in the spec)")
                values: np.ndarray = rng.integers(0, classes, (rows, *shape))
            elif dtype.kind in "iu":
                info = np.iinfo(dtype)
                values = rng.integers(max(info.min, 0), min(info.max, 255) + 1, (rows, *shape))
            elif dtype.kind == "b":
                values = rng.integers(0, 2, (rows, *shape))
            else:
                values = rng.normal(0, 1, (rows, *shape))
            f.create_dataset(key, data=values.astype(dtype))


def _copy_rows(src, path: Path, rows: int, extra: list[int]) -> None:
    """The first `rows` rows of every key of `src`, then the rows `extra`, with each dataset's
    chunking (no larger than the slice) and filters."""
    import h5py

    first = src.layouts[0].path
    with h5py.File(first, "r", locking=False) as orig, h5py.File(path, "w") as out, src.open() as reader:
        n = rows + len(extra)
        for key in src.keys:
            d = orig[key]
            chunks = (min(d.chunks[0], n), *d.chunks[1:]) if d.chunks else None
            dset = out.create_dataset(key, (n, *src.shapes[key]), src.dtypes[key], chunks=chunks,
                                      compression=d.compression, compression_opts=d.compression_opts,
                                      shuffle=d.shuffle)
            buf = np.empty((rows, *src.shapes[key]), src.dtypes[key])
            reader.read(key, 0, rows, buf)
            dset[:rows] = buf
            one = np.empty((1, *src.shapes[key]), src.dtypes[key])
            for i, r in enumerate(extra):
                reader.read(key, r, r + 1, one)
                dset[rows + i] = one[0]


def _source_row(src, where) -> int:
    """The source's own row number of a scan's Where (file, row in that file)."""
    before = 0
    for lay in src.layouts:
        if lay.path == where.path:
            return before + where.row
        before += lay.rows
    raise IndexError(where)


def prepare(spec: JobSpec, folder: Path, ranks: int, steps_per_epoch: int, *, synthetic: bool = False,
            shapes: Optional[list[str]] = None, classes: Optional[int] = None) -> Slice:
    """The slice (or stand-in) for the check's runs, in `folder`; BadInput naming what is wrong
    with the data (the trainer's own checks, on all of it) or what is missing."""
    from mpidl.data import H5Source
    from mpidl.data.scan import check_finite, check_labels, first_row, label_range

    d = spec.data
    total, train = rows_needed(spec, ranks, steps_per_epoch)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "slice.h5"
    sets = [f"data.files={json.dumps(str(path))}", "data.synth=null", "data.stage_dir=null"]
    keys = list(d.keys)
    given = [parse_shape(s) for s in shapes or []]
    src, missing = None, None
    if not given:
        try:
            src = H5Source(d.files, keys=keys).validate()
        except BadInput as e:
            missing = e
        if src is None and not synthetic and d.synth is not None and isinstance(d.files, str):
            # The job's own generator writes the slice, fewer rows.
            return Slice([f"data.files={json.dumps(str(path))}", f"data.synth.rows={total}", "data.stage_dir=null"],
                         f"{total} rows written by the spec's data.synth ({d.synth.kind}; {d.files} is not there)",
                         total)
        if src is None:
            raise BadInput(f"data.files: {missing}; for a stand-in of the same shapes give them: --shape "
                           f"{keys[0]}=3x32x32:uint8 --shape {keys[1]}=:int64 (and --classes N)")
    if given or synthetic:
        if given:
            layout = {k: (s, dt) for k, s, dt in given}
            if list(layout) != keys:
                raise BadInput(f"--shape: give one for each of data.keys {keys}, in that order (got {list(layout)})")
            whence = "the --shape flags"
        else:
            assert src is not None  # read above unless shapes were given
            layout = {k: (src.shapes[k], src.dtypes[k]) for k in keys}
            whence = f"{src.files[0]}'s metadata (--synthetic: no row read)"
        _write_random(path, total, layout, _classes(spec, classes), spec.seed)
        shown = ", ".join(f"{k} {'×'.join(map(str, s)) or 'scalar'} {dt}" for k, (s, dt) in layout.items())
        return Slice(sets, f"{total} random rows, shapes from {whence}: {shown}", total, layout)

    # The job's real rows, after the trainer's own checks of all of them.
    assert src is not None  # without one, --shape or a stand-in returned above
    if len(src) < total:
        raise BadInput(f"{src.files[0]}: {len(src)} rows, {ranks} ranks × batch {d.batch} × {steps_per_epoch} steps "
                       f"need {total}: fewer ranks (-n) or steps (--steps)")
    world, label = one_process(), keys[1]
    extra: list[int] = []
    kind = src.dtypes[label].kind
    if kind in "iu":
        count = _classes(spec, None)
        lo, hi = check_labels(src, world, label, count) if count else label_range(src, world, label)
        if not count and lo < 0:
            check_labels(src, world, label, hi + 1)  # names the first negative label
        for value in (lo, hi):  # the trainer infers the class count from the labels it sees
            _, where, _ = first_row(src, world, label, functools.partial(np.equal, value))
            row = _source_row(src, where)
            if row >= total and row not in extra:
                extra.append(row)
    elif kind == "f":
        check_finite(src, world, label, "target")
    _copy_rows(src, path, total, extra)
    val_sets = []
    if d.val_files is not None:
        val = H5Source(d.val_files, keys=keys).validate()
        n_val = min(len(val), ranks * d.batch)
        _copy_rows(val, folder / "val.h5", n_val, [])
        val_sets = [f"data.val_files={json.dumps(str(folder / 'val.h5'))}"]
    more = f" and {len(extra)} holding the label range" if extra else ""
    scanned = {"i": "; every label checked", "u": "; every label checked", "f": "; every target checked"}.get(kind, "")
    return Slice(sets + val_sets, f"the first {total} rows of {src.files[0]}{more} ({len(src)} rows in all{scanned})",
                 total + len(extra))
