"""`mpidl data synth|convert|inspect`."""
from __future__ import annotations

import argparse

import numpy as np


def cmd_synth(args: argparse.Namespace) -> int:
    import mpidl
    from mpidl.data import synth

    world = mpidl.init()
    common = dict(seed=args.seed, chunk_rows=args.chunk_rows, compression=args.compression, world=world)
    if args.kind == "images":
        synth.synth_images(args.out, args.rows, classes=args.classes or 10, channels=args.channels, size=args.size,
                           **common)
    else:
        synth.synth_tabular(args.out, args.rows, features=args.features, rule=args.rule, classes=args.classes,
                            **common)
    if world.rank == 0:
        print(f"wrote {args.rows} {args.kind} rows to {args.out} ({world.size} writer{'s' * (world.size > 1)})")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from mpidl.data.tools import convert

    written = convert(args.inputs, args.out, keys=args.keys, compression=args.compression,
                      chunk_rows=args.chunk_rows)
    for k, (shape, dtype) in written.items():
        print(f"{args.out}: {k} {shape} {dtype}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from mpidl.data.layout import expand_files
    from mpidl.data.tools import inspect

    for path in expand_files(args.files):
        print(inspect(path))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Validate a source for a job shape on every rank, as training would, before submitting.

    Unless --quick, also scans the values (each rank a share): non-finite values in float
    datasets and the range of integer labels, against --classes when given.
    """
    import mpidl
    from mpidl.data import H5Source
    from mpidl.data.scan import check_labels, label_range, nonfinite
    from mpidl.data.shard import check_shape
    from mpidl.errors import BadInput

    world = mpidl.init()
    src = H5Source(args.files, keys=args.keys)
    world.agree(src.validate)
    ranks = args.ranks or world.size
    world.agree(lambda: check_shape(len(src), ranks, args.batch))
    if args.classes is not None and args.labels not in src.keys:
        raise BadInput(f"--labels '{args.labels}' is not among the keys {list(src.keys)}")
    lines, problems = [], []
    for key in ([] if args.quick else src.keys):
        kind = src.dtypes[key].kind
        if kind == "f":
            count, where = nonfinite(src, world, key)
            lines.append(f"  {key}: " + (f"{count} non-finite values, the first in row {where.row} of {where.path}"
                                         if where else "no non-finite values"))
            if where:
                problems.append(f"{where} holds non-finite values ({count} in '{key}')")
        elif kind in "iu" and int(np.prod(src.shapes[key], dtype=np.int64)) == 1:
            lo, hi = label_range(src, world, key)
            lines.append(f"  {key}: integer labels {lo}..{hi}")
            if key == args.labels and args.classes is not None:
                try:
                    check_labels(src, world, key, args.classes)
                except BadInput as e:
                    problems.append(str(e))
    if world.rank == 0:
        shapes = ", ".join(f"{k} {src.shapes[k]} {src.dtypes[k]}" for k in src.keys)
        print(f"{'checked' if problems else 'ok'}: {len(src.files)} file(s), {len(src)} rows ({shapes}); "
              f"{len(src) // (ranks * args.batch)} steps per epoch at {ranks} ranks × batch {args.batch}", flush=True)
        print("\n".join(lines), flush=True)
    if problems:  # every rank holds the same findings: one line, exit 2 everywhere
        raise BadInput(problems[0], collective=world.size > 1)
    return 0


def _compression(value: str):
    return None if value in ("none", "") else value


def register(sub) -> None:
    data = sub.add_parser("data", help="dataset tools: synth, convert, inspect")
    dsub = data.add_subparsers(dest="data_command", required=True)

    s = dsub.add_parser("synth", help="write a learnable synthetic dataset (in parallel under MPI)")
    s.add_argument("kind", choices=["images", "tabular"])
    s.add_argument("--out", required=True)
    s.add_argument("--rows", type=int, required=True)
    s.add_argument("--classes", type=int, default=None, help="images: default 10; tabular: classify instead of regress")
    s.add_argument("--channels", type=int, default=3)
    s.add_argument("--size", type=int, default=16, help="image height and width")
    s.add_argument("--features", type=int, default=16)
    s.add_argument("--rule", choices=["linear", "nonlinear"], default="linear")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--chunk-rows", type=int, default=None, help="rows per chunk (default: contiguous)")
    s.add_argument("--compression", type=_compression, default=None, choices=[None, "gzip", "lzf"])
    s.set_defaults(func=cmd_synth)

    s = dsub.add_parser("convert", help=".npy/.npz arrays into chunked HDF5")
    s.add_argument("inputs", nargs="+")
    s.add_argument("--out", required=True)
    s.add_argument("--keys", nargs="*", default=None,
                   help="dataset names, one per .npy file in order, or the arrays of an .npz to "
                   "keep (default: x y for two .npy files, else each file's name)")
    s.add_argument("--chunk-rows", type=int, default=None)
    s.add_argument("--compression", type=_compression, default=None, choices=[None, "gzip", "lzf"])
    s.set_defaults(func=cmd_convert)

    s = dsub.add_parser("check", help="validate files for a job shape (every rank checks, exit 2 on bad input)")
    s.add_argument("files", nargs="+")
    s.add_argument("--keys", nargs="+", default=["x", "y"])
    s.add_argument("--batch", type=int, default=1, help="batch per rank")
    s.add_argument("--ranks", type=int, default=None, help="default: the ranks of this launch")
    s.add_argument("--classes", type=int, default=None, help="labels must lie in [0, classes)")
    s.add_argument("--labels", default="y", help="the labels dataset that --classes checks (default: y)")
    s.add_argument("--quick", action="store_true", help="metadata only: skip scanning the values")
    s.set_defaults(func=cmd_check)

    s = dsub.add_parser("inspect", help="layout, chunking, compression, size, and advice")
    s.add_argument("files", nargs="+")
    s.set_defaults(func=cmd_inspect)
