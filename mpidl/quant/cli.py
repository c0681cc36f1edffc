"""`mpidl quantize RUN_DIR [--calibrate ROWS] [--json]`."""
from __future__ import annotations

import argparse
import json


def cmd_quantize(args: argparse.Namespace) -> int:
    import mpidl
    from mpidl.quant.quantize import quantize_run

    world = mpidl.init()
    report = quantize_run(args.run_dir, world, calibrate=args.calibrate, log=None if args.json else print)
    if args.json and world.rank == 0:
        print(json.dumps(report, indent=2), flush=True)
    return 0


def register(sub) -> None:
    s = sub.add_parser("quantize", help="int8 post-training quantization of a run: accuracy, size, CPU latency")
    s.add_argument("run_dir", help="a trained run folder (its newest checkpoint is used)")
    s.add_argument("--calibrate", type=int, default=1024, metavar="ROWS",
                   help="training rows that set the activation ranges of static quantization (default 1024)")
    s.add_argument("--json", action="store_true", help="print the report as JSON instead of the table "
                   "(RUN_DIR/quantize.json is written either way)")
    s.set_defaults(func=cmd_quantize)
