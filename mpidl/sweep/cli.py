"""`mpidl sweep SWEEP.yaml [--retry-failed]`."""
from __future__ import annotations

import argparse


def cmd_sweep(args: argparse.Namespace) -> int:
    import mpidl
    from mpidl import startup
    from mpidl.sweep.run import run_sweep

    startup.load(*startup.TRAINING)  # its tasks train in this process

    run_sweep(args.sweep, mpidl.init(), retry_failed=args.retry_failed)
    return 0


def register(sub) -> None:
    s = sub.add_parser("sweep", help="many small trainings (grid or random search) spread over the ranks")
    s.add_argument("sweep", help="YAML sweep file: base job, grid and/or random fields, metric")
    s.add_argument("--retry-failed", action="store_true", help="run the tasks that failed before again")
    s.set_defaults(func=cmd_sweep)
