"""The benchmark scripts still run end to end (tiny sizes, nothing written); figures are theirs, not ours."""
from __future__ import annotations

import re
import sys

import pytest

from conftest import ROOT, run


@pytest.mark.slow
@pytest.mark.mpi  # its child starts mpirun
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
    # each side's own time per step (windows, plain, mpidl, difference and its interval, % of the step)
    own = re.search(r"^mpi\s+3\s+(\d+)\s+(\d+)\s+(-?\d+)\s+\[(-?\d+), (-?\d+)\]\s+(-?[\d.]+)$", r.stdout, re.M)
    assert own, r.stdout
    plain_us, mpidl_us, diff, lo, hi = (int(own.group(i)) for i in range(1, 6))
    assert plain_us > 0 and mpidl_us > 0 and lo <= diff <= hi
    assert "wrote" not in r.stdout


def test_gpu_check_skips_cleanly_without_cuda(tmp_path):
    """`make gpu-check` where torch has no CUDA: says so, records the skip, exits 0, touches nothing."""
    import json

    from conftest import has_cuda

    if has_cuda():
        import pytest

        pytest.skip("CUDA is here: gpu_check.sh would run the whole check")
    out = tmp_path / "out"
    r = run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "run", str(out)], env={"PYTHON": sys.executable},
            timeout=120)
    assert r.returncode == 0, r.output
    assert "no CUDA device" in r.stdout
    summary = json.loads((out / "gpu-check.json").read_text())
    assert summary["skipped"] == "no CUDA device" and summary["stages"] == [] and summary["failed"] is False
    if (ROOT / "offline" / "COMMIT").is_file():  # the commit the carried checkout was prepared at
        assert summary["prepared_at"] == (ROOT / "offline" / "COMMIT").read_text().strip()
    else:
        assert summary["prepared_at"] is None
    assert "no CUDA device" in (out / "gpu-check.log").read_text()


def test_gpu_check_needs_an_output_folder(tmp_path):
    r = run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "run"], env={"PYTHON": sys.executable, "OUT": ""},
            timeout=60)
    assert r.returncode == 1 and "give the output folder" in r.stderr


def test_prepared_wheels_close_over_what_the_gpu_machine_lacks(tmp_path):
    """Where `make gpu-check-prepare` has run: the folder alone (no index) holds a CPython 3.12 wheel
    of every requirement, and of each of their requirements in turn, but what the GPU machine's
    python has (torch, numpy, mpi4py, h5py), which the prepared folder leaves out to stay small."""
    import zipfile
    from email.parser import Parser

    import pytest
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    wheels = ROOT / "offline" / "wheels"
    if not wheels.is_dir():
        pytest.skip("offline/ not prepared (make gpu-check-prepare)")
    reqs = run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "requirements"],
               env={"PYTHON": sys.executable}).stdout.split()
    assert "submitit>=1.5" in reqs and not any(r.startswith(("torch", "numpy")) for r in reqs)
    r = run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-index", "--find-links", str(wheels),
             "--only-binary", ":all:", "--python-version", "3.12", "--implementation", "cp",
             "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64", "-d", str(tmp_path), *reqs,
             "cffi", "cloudpickle", "psutil", "setuptools>=61", "wheel"], timeout=120)
    assert r.returncode == 0, r.output[-2000:]
    have = {"torch", "numpy", "mpi4py", "h5py"}
    assert not [w.name for w in wheels.glob("*.whl") if canonicalize_name(w.name.split("-")[0]) in have]
    provided = {canonicalize_name(w.name.split("-")[0]) for w in wheels.glob("*.whl")} | have
    env = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3", "extra": ""}
    for whl in wheels.glob("*.whl"):
        with zipfile.ZipFile(whl) as z:
            name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            meta = Parser().parsestr(z.read(name).decode())
        for line in meta.get_all("Requires-Dist") or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate(env):
                assert canonicalize_name(req.name) in provided, (whl.name, line)
