"""`mpidl check JOB.yaml [-n N] [--steps S] [--set ...]`, and `mpidl check [RESOURCES.yaml] -- CMD`."""
from __future__ import annotations

import argparse
from pathlib import Path


def cmd_check(args: argparse.Namespace) -> int:
    from mpidl.check.runner import check

    return check(args.job, args.set, ranks=args.np, steps=args.steps, synthetic=args.synthetic, shapes=args.shape,
                 classes=args.classes, timeout=args.timeout, out=Path(args.out) if args.out else None,
                 program=args.program, only=args.only)


def register(sub) -> None:
    s = sub.add_parser("check", help="run a job for a few steps on local CPU ranks and check it before you submit",
                       usage="mpidl check JOB.yaml [options]\n       mpidl check [RESOURCES.yaml] [options] -- CMD ...",
                       description="Run JOB.yaml with `mpidl train` for a few steps on N local CPU ranks (mpirun), on "
                                   "a small slice of its data or a stand-in of the same shapes, and check: the spec, "
                                   "the data, a finite loss, each rank's share, identical weights after every step, "
                                   "a preemption signal mid-step (checkpoint, exit 3), a resume bit for bit, the "
                                   "slurm: section against the controller (sbatch --test-only, where one answers); "
                                   "then the step time and peak memory per rank. One line per check. Exit status: "
                                   "0 when none failed, 1 when one did, 2 when the spec does not validate. After "
                                   "`--`, a command whose loop is on mpidl.Run (e.g. -- python train.py): it runs with "
                                   "MPIDL_OUTPUT and MPIDL_STEPS, on its own data, the same checks but the data's.")
    s.add_argument("job", nargs="?", help="YAML job spec, e.g. jobs/demo.yaml; with a command: a YAML file holding "
                                          "its slurm: section (optional)")
    s.add_argument("-n", "--np", type=int, default=2, metavar="N", help="local ranks (default 2)")
    s.add_argument("--steps", type=int, default=8, metavar="S", help="optimizer steps of a run (default 8, at least 6)")
    s.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a field, as for mpidl train (e.g. --set backend=mpi where Horovod is missing)")
    s.add_argument("--synthetic", action="store_true",
                   help="random rows of the data files' shapes and dtypes (their metadata is read, no row): for "
                        "large or remote data")
    s.add_argument("--shape", action="append", default=[], metavar="KEY=DIMS:DTYPE",
                   help="the data's shapes where its files are not here, one per key: --shape x=3x32x32:uint8 "
                        "--shape y=:int64")
    s.add_argument("--classes", type=int, default=None, metavar="N",
                   help="classes of a stand-in's integer labels (default: the spec's)")
    s.add_argument("--timeout", type=float, default=300, metavar="S", help="seconds a run may take (default 300)")
    s.add_argument("--out", default=None, metavar="DIR",
                   help="keep the runs, logs and data slice here (default: a temporary folder, kept when a line fails)")
    s.add_argument("--only", type=lambda text: [x.strip() for x in text.split(",") if x.strip()], default=None,
                   metavar="LINE,...", help="check these lines only, and launch only the runs they need (e.g. "
                                            "--only slurm: no run; --only weights: one run, not three)")
    s.set_defaults(func=cmd_check, program=None)
