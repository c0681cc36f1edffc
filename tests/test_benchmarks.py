"""The benchmark scripts still run end to end (tiny sizes, nothing written); figures are theirs, not ours."""
from __future__ import annotations

import re
import sys

from conftest import ROOT, run


def test_bench_train_resnet_workload_smoke():
    # The GPU goal's workload (bf16, channels_last, HDF5 uint8 vs synthetic tensors) shrunk to CPU size.
    r = run([sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--workload", "resnet50",
             "--model", "resnet18", "--size", "32", "--batch", "4", "--rows", "64", "--steps", "4",
             "--log-every", "2", "--repeats", "1", "--backends", "mpi", "--windows", "3", "--window-steps", "2",
             "--no-write"], timeout=600)
    assert r.returncode == 0, r.output[-3000:]
    rows = {m.group(1).strip(): float(m.group(2)) for m in
            re.finditer(r"^(plain PyTorch, 1 rank|mpidl mpi, [12] ranks?)\s+(\d+)\s", r.stdout, re.M)}
    assert set(rows) == {"plain PyTorch, 1 rank", "mpidl mpi, 1 rank", "mpidl mpi, 2 ranks"}, r.stdout
    assert all(v > 0 for v in rows.values())
    inproc = re.search(r"^mpi\s+([\d.]+)\s+([\d.]+)\s+(-?\d+)\s+([\d.]+)\s+\[([\d.]+), ([\d.]+)\]$", r.stdout, re.M)
    assert inproc, r.stdout  # plain ms, mpidl ms, what mpidl adds (us), ratio and its interval
    ratio, lo, hi = (float(inproc.group(i)) for i in (4, 5, 6))
    assert float(inproc.group(1)) > 0 and float(inproc.group(2)) > 0 and lo <= ratio <= hi
    assert "wrote" not in r.stdout
