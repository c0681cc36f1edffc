"""What every benchmark records beside its figures: machine, versions, commit, time.

Import it from a benchmark script as `from common import environment, write_result`
(benchmarks/ is on sys.path when a script there runs).
"""
from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import time
from pathlib import Path
from typing import Iterable

from mpidl.scaling.environment import commit, cpu_model, mpi_library  # one definition for studies and benchmarks

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]


def machine_name() -> str:
    """A short, stable name for result files: the GPU's model on a GPU machine, else 'cpu<N>'."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0).replace("NVIDIA ", "").replace(" ", "-").lower()
    except ImportError:
        pass
    return f"cpu{os.cpu_count()}"


def environment() -> dict:
    versions: dict = {"python": platform.python_version()}
    for mod in ("torch", "numpy", "h5py", "mpi4py", "horovod"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            versions[mod] = None
    try:
        versions["mpi"] = mpi_library()
    except Exception:
        versions["mpi"] = None
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return {
        "machine": {"name": machine_name(), "host": socket.gethostname(), "cpus": os.cpu_count(),
                    "cpu_model": cpu_model(), "gpu": gpu},
        "versions": versions,
        "commit": commit(ignore=RESULTS),  # a rerun rewrites its own results file: not a change to the code
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def write_result(name: str, figures: dict) -> Path:
    """Write benchmarks/results/<name>-<machine>.json atomically and return its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{machine_name()}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**environment(), **figures}, indent=2) + "\n")
    os.replace(tmp, path)
    return path
