"""How long `mpidl check` takes on the demo, and where the time goes.

    .venv/bin/python benchmarks/bench_check.py            [--repeats N] [--job jobs/demo.yaml] [--np 2]

Runs `mpidl check JOB` N times in a fresh temporary folder each (so the demo's data is the
slice its data.synth writes, as on a fresh checkout), and reports per repeat: the wall time of
the whole command, the seconds of each of its three runs as its check.json gives them (the
uninterrupted run, the preempted one, the resumed one, each a `mpirun` launch: Python, torch,
MPI and the trainer's set-up, then a few steps), and the one-minute load average before it (the
machine may be shared). The last row is the median of each column.
Results: benchmarks/results/check-<machine>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import median, write_result  # noqa: E402


def one(job: Path, ranks: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-check-") as tmp:
        load = os.getloadavg()[0]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "mpidl.cli", "check", str(job), "-n", str(ranks), "--out",
                            str(Path(tmp) / "out")], capture_output=True, text=True, cwd=tmp, env=env)
        wall = time.monotonic() - t0
        if p.returncode != 0:
            raise SystemExit(f"mpidl check failed (exit {p.returncode}):\n{p.stdout}{p.stderr}")
        report = json.loads((Path(tmp) / "out" / "check.json").read_text())
    runs = report["runs"]
    return {"wall_s": wall, "check_s": report["seconds"], "run_a_s": runs["a"], "run_b_s": runs["b"],
            "run_c_s": runs["c"], "load_before": load}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--job", default=str(HERE.parent / "jobs" / "demo.yaml"))
    ap.add_argument("--np", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    rows = [one(Path(args.job), args.np) for _ in range(args.repeats)]
    print(f"{'repeat':<8}{'wall s':>8}{'run A s':>9}{'run B s':>9}{'run C s':>9}{'load':>7}")
    for i, r in enumerate(rows, 1):
        print(f"{i:<8}{r['wall_s']:>8.1f}{r['run_a_s']:>9.1f}{r['run_b_s']:>9.1f}{r['run_c_s']:>9.1f}"
              f"{r['load_before']:>7.2f}")
    med = {k: median(r[k] for r in rows) for k in ("wall_s", "run_a_s", "run_b_s", "run_c_s", "load_before")}
    print(f"{'median':<8}{med['wall_s']:>8.1f}{med['run_a_s']:>9.1f}{med['run_b_s']:>9.1f}{med['run_c_s']:>9.1f}"
          f"{med['load_before']:>7.2f}")
    if not args.no_write:
        path = write_result("check", {"job": os.path.relpath(args.job, HERE.parent), "ranks": args.np,
                                      "repeats": rows, "median": med})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
