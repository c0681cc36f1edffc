"""What a rank's start and exit cost, with and without mpidl/startup.py's collector handling.

    .venv/bin/python benchmarks/bench_startup.py      [--repeats N] [--np 2] [--backends mpi,ddp,horovod]

Runs the same tiny job (an MLP on 2,000 synthetic rows, 2 epochs: well under a second of
training) with `mpirun -np N mpidl train`, alternating Python's default collector
(MPIDL_GC_FREEZE=0, the reference) and mpidl's (torch and its compiler loaded with the collector
off, then frozen; the rest frozen at exit), N repeats each, per backend. Per launch: the wall
time and the CPU time of mpirun and its ranks (user + system, from the launch's rusage).
Medians and the ratio mpidl / reference. Results: benchmarks/results/startup-<machine>.json.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import median, write_result  # noqa: E402

from mpidl.startup import ENV  # noqa: E402
from mpidl.world import LOCAL_MPIRUN_ENV  # noqa: E402

VARIANTS = {"python": "0", "mpidl": "1"}  # MPIDL_GC_FREEZE: the reference first


def job(folder: Path) -> Path:
    spec = {"name": "startup", "seed": 3, "epochs": 2, "backend": "mpi",
            "data": {"files": str(folder / "tab.h5"), "batch": 16, "val_fraction": 0.1,
                     "synth": {"kind": "tabular", "rows": 2000, "features": 8, "classes": 3}},
            "model": {"name": "mlp", "args": {"hidden": [32], "num_classes": 3}},
            "optimizer": {"name": "sgd", "lr": 0.05}, "output": str(folder / "run"), "log_every": 10}
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def launch(spec: Path, ranks: int, backend: str, gc_freeze: str) -> dict:
    mpidl = Path(sys.executable).with_name("mpidl")
    env = {**os.environ, **LOCAL_MPIRUN_ENV, ENV: gc_freeze}
    cmd = [shutil.which("mpirun") or "mpirun", "-np", str(ranks), "-x", ENV, str(mpidl), "train", str(spec),
           "--overwrite", "--set", f"backend={backend}"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {p.returncode}):\n{p.stdout}{p.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--np", type=int, default=2)
    ap.add_argument("--backends", default="mpi,ddp,horovod")
    args = ap.parse_args()
    backends = [b for b in args.backends.split(",") if b]
    runs: dict = {b: {v: [] for v in VARIANTS} for b in backends}
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        spec = job(Path(tmp))
        launch(spec, args.np, backends[0], "1")  # writes the data once, warms the page cache
        for _ in range(args.repeats):
            for backend in backends:
                for variant, value in VARIANTS.items():  # alternated: the machine's speed drifts
                    runs[backend][variant].append(launch(spec, args.np, backend, value))
    rows = []
    print(f"{args.np} ranks, {args.repeats} launches each; CPU = mpirun and its ranks, user + system")
    print(f"{'backend':8s} {'collector':9s} {'wall s':>7s} {'CPU s':>6s} {'CPU s/rank':>10s}")
    for backend in backends:
        med = {v: {k: median(r[k] for r in runs[backend][v]) for k in ("wall_s", "cpu_s")} for v in VARIANTS}
        for variant in VARIANTS:
            m = med[variant]
            print(f"{backend:8s} {variant:9s} {m['wall_s']:7.2f} {m['cpu_s']:6.2f} {m['cpu_s'] / args.np:10.2f}")
        ratio = {k: med["mpidl"][k] / med["python"][k] for k in ("wall_s", "cpu_s")}
        print(f"{backend:8s} {'ratio':9s} {ratio['wall_s']:7.2f} {ratio['cpu_s']:6.2f}")
        rows.append({"backend": backend, "median": med, "ratio_mpidl_to_python": ratio, "runs": runs[backend]})
    path = write_result("startup", {"ranks": args.np, "repeats": args.repeats, "job": "MLP, 2,000 rows, 2 epochs",
                                    "results": rows})
    print(f"wrote {path.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
