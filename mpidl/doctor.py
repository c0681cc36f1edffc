"""`mpidl doctor`: is the stack here, and what was it built with?

Each check gives (ok, detail, fix). Core checks decide the exit status; the others
(CUDA, SLURM) only inform, since CPU-only machines and laptops are fine places to work.
"""
from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from mpidl.install.cuda import Kernels, cap_number, cap_text, missed, package_kernels

HOROVOD_FIX = ("run `mpidl setup horovod` (it builds the patched Horovod 0.28.1 for this environment; "
               "--dry-run shows how)")


def in_checkout() -> bool:
    """Whether mpidl runs from its checkout (an editable install), where scripts/setup.sh is."""
    return (Path(__file__).resolve().parents[1] / "scripts" / "setup.sh").is_file()


def setup_fix(check: str) -> str:
    """How to repair a failed core check, for a checkout or for a pip install."""
    if check == "horovod":
        return HOROVOD_FIX
    if in_checkout():
        return "run `bash scripts/setup.sh` (or `make test`) from the mpidl checkout"
    if check == "mpi":
        return ("rebuild mpi4py against the MPI on PATH (`module load openmpi`, names vary by site): "
                "`pip install --force-reinstall --no-binary mpi4py mpi4py`")
    return "install mpidl's requirements into this environment: `pip install mpidl`"


@dataclass
class Check:
    name: str
    ok: bool
    core: bool
    detail: str
    fix: str = ""
    info: dict = field(default_factory=dict)


def _python() -> Check:
    ok = sys.version_info >= (3, 9)
    return Check("python", ok, True, platform.python_version(), "" if ok else "use Python >= 3.9",
                 {"version": platform.python_version(), "executable": sys.executable})


def _torch() -> Check:
    import torch

    cuda = torch.cuda.is_available()
    info = {"version": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": cuda,
            "gpus": torch.cuda.device_count() if cuda else 0}
    detail = f"{torch.__version__}, " + (f"CUDA {torch.version.cuda}, {info['gpus']} GPU(s)" if cuda else "CPU")
    return Check("torch", True, True, detail, info=info)


def _numpy() -> Check:
    import numpy

    return Check("numpy", True, True, numpy.__version__, info={"version": numpy.__version__})


def _mpi() -> Check:
    import mpi4py
    from mpi4py import MPI

    from mpidl.scaling.environment import mpi_library

    lib = mpi_library()
    std = "%d.%d" % MPI.Get_version()
    info = {"mpi4py": mpi4py.__version__, "library": lib, "standard": std,
            "mpirun": shutil.which("mpirun")}
    ok = info["mpirun"] is not None
    return Check("mpi", ok, True, f"mpi4py {mpi4py.__version__}, {lib} (MPI {std})",
                 "" if ok else "mpirun is not on PATH: apt-get install openmpi-bin, or `module load openmpi`", info)


def gpu_mismatch(kernels: Kernels, gpus: list[tuple[str, tuple[int, int]]]) -> str:
    """One line naming the GPUs here that no CUDA kernel of Horovod's runs on ('' when there are
    none, or when Horovod has no kernels at all: a CPU build, which its detail says). `gpus`: (name,
    compute capability) each."""
    if not kernels or not gpus:
        return ""
    lost = missed(kernels, [cap for _, cap in gpus])
    if not lost:
        return ""
    names = ", ".join(sorted({f"{name} ({cap_text(cap_number(cap))})" for name, cap in gpus if cap in lost}))
    return f"CUDA kernels {kernels.describe()} do not run on this node's {names}"


def _gpus() -> list[tuple[str, tuple[int, int]]]:
    import torch

    if not (torch.version.cuda and torch.cuda.is_available()):
        return []
    return [(torch.cuda.get_device_name(i), tuple(torch.cuda.get_device_capability(i)))  # type: ignore[misc]
            for i in range(torch.cuda.device_count())]


def _horovod() -> Check:
    import horovod
    import horovod.torch as hvd

    kernels = package_kernels(Path(horovod.__file__).parent)
    info = {"version": horovod.__version__, "mpi": bool(hvd.mpi_built()), "gloo": bool(hvd.gloo_built()),
            "nccl": bool(hvd.nccl_built()), "cuda_kernels": {"sass": sorted(kernels.sass), "ptx": sorted(kernels.ptx)}}
    built = ", ".join(k.upper() for k in ("mpi", "gloo", "nccl") if info[k]) or "nothing"
    detail = f"{horovod.__version__} built with {built}"
    gpus = _gpus()
    missing = gpu_mismatch(kernels, gpus)
    if missing:
        return Check("horovod", False, True, f"{detail}: {missing}",
                     "rebuild it: `mpidl setup horovod` compiles for the architectures torch lists "
                     "(or set HOROVOD_BUILD_CUDA_CC_LIST, e.g. 80,90)", info)
    if kernels:
        detail += f"; CUDA kernels {kernels.describe()}"
    elif gpus:
        detail += "; no CUDA kernels, though this node has GPUs"
    ok = info["mpi"]
    return Check("horovod", ok, True, detail, "" if ok else "Horovod lacks MPI support: " + HOROVOD_FIX, info)


def _h5py() -> Check:
    import h5py

    info = {"version": h5py.__version__, "hdf5": h5py.version.hdf5_version, "mpi": bool(h5py.get_config().mpi)}
    return Check("h5py", True, True, f"{h5py.__version__}, HDF5 {info['hdf5']}" + (", parallel" if info["mpi"] else ""),
                 info=info)


def _submitit() -> Check:
    import submitit

    return Check("submitit", True, True, submitit.__version__, info={"version": submitit.__version__})


def _slurm() -> Check:
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return Check("slurm", False, False, "not installed (scontrol not on PATH)",
                     "needed only to submit jobs: run on a SLURM login node", {"controller": None})
    try:
        out = subprocess.run([scontrol, "ping"], capture_output=True, text=True, timeout=10)
        text = (out.stdout + out.stderr).strip().splitlines()
        up = out.returncode == 0 and any("UP" in line for line in text)
        detail = text[0] if text else f"scontrol ping exited {out.returncode}"
    except subprocess.TimeoutExpired:
        up, detail = False, "scontrol ping timed out after 10 s"
    return Check("slurm", up, False, detail, "" if up else "no SLURM controller answers: check slurmctld",
                 {"controller": up})


CHECKS: list[tuple[str, Callable[[], Check], bool]] = [
    ("python", _python, True), ("torch", _torch, True), ("numpy", _numpy, True), ("mpi", _mpi, True),
    ("horovod", _horovod, True), ("h5py", _h5py, True), ("submitit", _submitit, True), ("slurm", _slurm, False),
]


def run_checks() -> list[Check]:
    results = []
    for name, fn, core in CHECKS:
        try:
            results.append(fn())
        except Exception as e:  # an import or a library call failed: that is the finding
            msg = f"{type(e).__name__}: {e}".splitlines()[0]
            results.append(Check(name, False, core, msg, setup_fix(name) if core else ""))
    return results


def healthy(results: list[Check]) -> bool:
    return all(c.ok for c in results if c.core)


def as_json(results: list[Check]) -> dict:
    return {"ok": healthy(results), "checks": {c.name: asdict(c) for c in results}}


def render(results: list[Check]) -> str:
    lines = []
    for c in results:
        mark = "ok  " if c.ok else ("FAIL" if c.core else "--  ")
        lines.append(f"{mark} {c.name:<9} {c.detail}")
    problems = [c for c in results if not c.ok and c.fix]
    for c in problems:
        lines.append(f"{'problem' if c.core else 'note'}: {c.name}: {c.fix}")
    return "\n".join(lines)


def first_problem(results: list[Check]) -> Optional[Check]:
    return next((c for c in results if c.core and not c.ok), None)
