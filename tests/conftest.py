"""Shared test helpers: launch real ranks with mpirun and collect what they print."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
MPIRUN = shutil.which("mpirun")

# Root needs OpenMPI's consent; 3 ranks on 2 cores need oversubscription; containers
# often forbid the cross-memory attach that vader's single copy uses.
MPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
    "OMPI_MCA_btl_vader_single_copy_mechanism": "none",
    "PYTHONUNBUFFERED": "1",
    "OMP_NUM_THREADS": "1",
}


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def clean_env(extra: dict | None = None) -> dict:
    """The environment a test's child sees: no launcher variables leaking in from outside."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OMPI_COMM_WORLD", "PMIX_", "PMI_", "SLURM_"))}
    env.update(MPI_ENV)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if extra:
        env.update(extra)
    return env


def run(cmd: list[str], *, timeout: float = 120, env: dict | None = None, cwd: Path | str | None = None) -> Ran:
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=clean_env(env),
                       cwd=cwd or ROOT)
    return Ran(p.returncode, p.stdout, p.stderr, time.monotonic() - t0)


def mpirun(np_: int, args: list[str], *, timeout: float = 180, env: dict | None = None,
           cwd: Path | str | None = None) -> Ran:
    """`mpirun -np N <args>` with a hard timeout: a hang fails the test instead of CI."""
    if MPIRUN is None:
        pytest.skip("mpirun not installed")
    return run([MPIRUN, "-np", str(np_), *args], timeout=timeout, env=env, cwd=cwd)


def mpidl_cmd(*args: str) -> list[str]:
    """The CLI as a rank runs it."""
    return [PYTHON, "-m", "mpidl.cli", *args]


def pycode(code: str) -> list[str]:
    return [PYTHON, "-c", code]


def has_horovod() -> bool:
    try:
        import horovod.torch  # noqa: F401
    except Exception:
        return False
    return True


needs_horovod = pytest.mark.skipif(not has_horovod(), reason="Horovod is not installed")


def has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def needs_cuda(test):
    """Runs only where CUDA works; marked `gpu`, so `pytest -m gpu` selects every such test."""
    return pytest.mark.gpu(pytest.mark.skipif(not has_cuda(), reason="no CUDA device")(test))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real one-node SLURM cluster (slurm/cluster.sh) for this test session; yields its env.

    Skips where SLURM is not installed and cannot be (not root); stops only what it started.
    """
    if shutil.which("slurmctld") is None or shutil.which("srun") is None:
        pytest.skip("SLURM is not installed (as root: bash slurm/cluster.sh install)")
    state = tmp_path_factory.mktemp("slurm")
    env = {"MPIDL_SLURM_DIR": str(state), "MPIDL_SLURMCTLD_PORT": str(_free_port()),
           "MPIDL_SLURMD_PORT": str(_free_port())}
    script = str(ROOT / "slurm" / "cluster.sh")
    started = run(["bash", script, "start"], env=env, timeout=90)
    assert started.returncode == 0, started.output
    cluster_env = {**env, "SLURM_CONF": str(state / "slurm.conf")}
    yield cluster_env
    run(["bash", script, "stop"], env=env, timeout=60)
