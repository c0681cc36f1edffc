"""`mpidl setup horovod` and `mpidl examples`."""
from __future__ import annotations

import argparse
from pathlib import Path


def cmd_setup(args: argparse.Namespace) -> int:
    from mpidl.install import horovod

    return horovod.setup(dry_run=args.dry_run, rebuild=args.rebuild, as_json=args.json, check=args.check)


def cmd_examples(args: argparse.Namespace) -> int:
    from mpidl.install import examples

    root = examples.source()
    if args.copy:
        dest = Path(args.copy)
        rels = examples.copy(dest)
        print(f"copied {len(rels)} files into {dest}/: jobs/ (job specs), benchmarks/studies/ (scaling studies), "
              "examples/ (your own loop)")
        print("from there: mpirun -np 2 mpidl train jobs/demo.yaml; mpidl submit --dry-run jobs/demo.yaml")
        return 0
    for rel in examples.files(root):
        print(f"{str(rel):<45} {examples.summary(root / rel)}")
    print("copy them all: mpidl examples --copy DIR")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("setup", help="install what pip cannot: `mpidl setup horovod` builds the patched Horovod "
                                     "0.28.1 for this environment's torch and CUDA architectures")
    s.add_argument("what", choices=["horovod"], help="horovod: build (or take from the wheel cache) and install")
    s.add_argument("--dry-run", action="store_true",
                   help="print what would be built or installed, and the build's variables; change nothing")
    s.add_argument("--rebuild", action="store_true", help="build again even if a cached wheel fits")
    s.add_argument("--check", action="store_true",
                   help="exit 0 when the Horovod installed is the build planned here, 1 otherwise")
    s.add_argument("--json", action="store_true", help="the plan, the facts it rests on and the action, as JSON")
    s.set_defaults(func=cmd_setup)

    s = sub.add_parser("examples", help="the job specs, scaling studies and loops to start from; --copy DIR "
                                        "copies them")
    s.add_argument("--copy", metavar="DIR", help="copy them into DIR, keeping their paths (jobs/, "
                                                 "benchmarks/studies/, examples/)")
    s.set_defaults(func=cmd_examples)
