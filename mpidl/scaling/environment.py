"""What a study records about where it ran: CPU, GPU, cores, MPI, NCCL, Horovod, torch, commit,
and the environment variables that tune communication (MCA parameters, HOROVOD_*, NCCL_*).

`probe()` asks a child interpreter (the one the ranks run), so the study's own process never
initialises MPI: `python -m mpidl.scaling.environment` prints the same as JSON.
"""
from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[2]


def mpi_library() -> str:
    """The MPI library behind mpi4py as its version string starts ("Open MPI v4.1.6");
    ImportError without mpi4py."""
    from mpi4py import MPI

    return MPI.Get_library_version().strip().splitlines()[0].split(",")[0]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cores() -> int:
    """Cores this process may use (the affinity mask, which containers and allocations narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def commit(ignore: Optional[Path] = None) -> str:
    """The checkout's commit, '-dirty' when tracked files differ from it (apart from `ignore`: a
    committed study's own folder, which rerunning it rewrites)."""
    spec = ["--", "."]
    if ignore is not None:
        try:
            spec.append(f":(exclude){Path(ignore).resolve().relative_to(REPO)}")
        except ValueError:
            pass  # outside the checkout: nothing to leave out
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no", *spec],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + ("-dirty" if dirty else "")) if head else "unknown"


def _collect() -> dict:
    """Run in the child: versions of everything a rank imports."""
    out: dict = {"python": platform.python_version()}
    import torch

    out["torch"] = torch.__version__
    out["cuda"] = torch.version.cuda
    cuda = torch.cuda.is_available()
    out["gpu"] = torch.cuda.get_device_name(0) if cuda else None
    out["gpus"] = torch.cuda.device_count() if cuda else 0
    try:
        v = torch.cuda.nccl.version() if cuda else None
        out["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else v
    except Exception:
        out["nccl"] = None
    try:
        import mpi4py

        out["mpi4py"] = mpi4py.__version__
        out["mpi"] = mpi_library()
    except Exception as e:
        out["mpi"] = f"unavailable ({type(e).__name__})"
    try:
        import horovod
        import horovod.torch as hvd

        built = [k for k in ("mpi", "gloo", "nccl") if getattr(hvd, f"{k}_built")()]
        out["horovod"] = f"{horovod.__version__} ({'+'.join(built) or 'nothing'})"
    except Exception:
        out["horovod"] = None
    for mod in ("numpy", "h5py"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = None
    return out


# Environment variables that change how ranks communicate or compute (MCA parameters, Horovod's
# fusion and cycle, NCCL's algorithms, threads): a study records the ones set.
TUNING_PREFIXES = ("OMPI_MCA_", "HOROVOD_", "NCCL_", "MPIDL_HOROVOD_", "OMP_NUM_THREADS")


def tuning_env() -> dict[str, str]:
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(TUNING_PREFIXES)}


def probe(output: Optional[Path] = None) -> dict:
    """The machine and the software stack, as the ranks will see it (`output`: the study's folder)."""
    env = {"host": socket.gethostname(), "cpu_model": cpu_model(), "cores": cores(),
           "cpu_count": os.cpu_count(), "os": platform.platform(), "commit": commit(ignore=output),
           "tuning_env": tuning_env()}
    try:
        p = subprocess.run([sys.executable, "-m", "mpidl.scaling.environment"], capture_output=True, text=True,
                           timeout=300, cwd=REPO)
        env.update(json.loads(p.stdout.strip().splitlines()[-1]))
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        env["versions"] = "probe failed"
    return env


if __name__ == "__main__":
    print(json.dumps(_collect()))
