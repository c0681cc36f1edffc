"""The set-up path: without root it names what is missing and how to get it, then stops."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import ROOT


def test_setup_without_root_names_missing_packages():
    runuser = shutil.which("runuser")
    if os.geteuid() != 0 or runuser is None:
        pytest.skip("needs root to run the script as an unprivileged user")
    tmp_path = Path(tempfile.mkdtemp(prefix="mpidl-setup-"))  # pytest's tmp is private to root
    tmp_path.chmod(0o755)
    # The script runs from a copy `nobody` can read: the checkout may sit where it cannot enter.
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    for part in ("scripts/setup.sh", "setup.cfg"):
        shutil.copy(ROOT / part, checkout / part)
    for folder in (checkout, checkout / "scripts"):
        folder.chmod(0o755)
    # A PATH with the basics but no MPI, compilers or CMake: what a bare login node looks like.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "id", "cat", "sha256sum", "cut", "dirname", "nproc", "printf"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    bin_dir.chmod(0o755)
    p = subprocess.run([runuser, "-u", "nobody", "--", str(bin_dir / "bash"), str(checkout / "scripts" / "setup.sh")],
                       capture_output=True, text=True, timeout=60,
                       env={"PATH": str(bin_dir), "HOME": str(tmp_path), "PYTHON": "python3"})
    assert p.returncode != 0
    err = p.stderr
    assert "missing system packages:" in err
    for pkg in ("openmpi-bin", "libopenmpi-dev", "g++", "cmake", "python3"):
        assert pkg in err
    assert "module load openmpi" in err
    shutil.rmtree(tmp_path)


def test_submitit_pin_has_every_parameter_the_executor_passes():
    """`teardown` (the job's exit record) came in submitit 1.5.4: with `submitit>=1.5` every
    submit failed on 1.5.0-1.5.3. The pin excludes them; the installed submitit takes every
    parameter mpidl passes."""
    import configparser
    import inspect

    requirements = pytest.importorskip("packaging.requirements")
    from submitit.slurm.slurm import _make_sbatch_string

    from mpidl.slurm import executor
    from mpidl.slurm.script import Plan
    from mpidl.spec import load_spec

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    pins = [requirements.Requirement(line) for line in cfg["options"]["install_requires"].split("\n") if line.strip()]
    submitit = next(r for r in pins if r.name == "submitit")
    assert not submitit.specifier.contains("1.5.3") and submitit.specifier.contains("1.5.4"), submitit
    plan = Plan(load_spec(ROOT / "jobs" / "demo.yaml", ["slurm.launcher=mpirun"]), "jobs/demo.yaml")
    taken = set(inspect.signature(_make_sbatch_string).parameters)
    assert "teardown" in executor.parameters(plan) and set(executor.parameters(plan)) <= taken
