"""`mpidl examples`: the job specs, studies and loops a newcomer starts from, reachable from a
pip-installed mpidl.

They live in the checkout (jobs/, benchmarks/studies/, examples/); a wheel carries them as
mpidl/_examples/ with the same paths (setup.py copies FILES there; MANIFEST.in brings them into the
sdist), so a copy runs from its folder as from a checkout: `mpidl train jobs/demo.yaml`, `mpidl scale
benchmarks/studies/cpu2-strong.yaml`.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from mpidl.errors import BadInput, Fault

# Read by setup.py without importing mpidl (keep it a literal); the studies name the allreduce
# results they show, so that file comes along.
FILES = (
    "jobs/*.yaml",
    "jobs/sweeps/*.yaml",
    "benchmarks/studies/*.yaml",
    "benchmarks/results/allreduce-cpu2.json",
    "examples/*.py",
)
SHIPPED = "_examples"


def source() -> Path:
    """The folder the examples are read from: the installed package's copy, else the checkout."""
    package = Path(__file__).resolve().parents[1]
    if (package / SHIPPED).is_dir():
        return package / SHIPPED
    if (package.parent / "jobs").is_dir():
        return package.parent
    raise Fault(f"the examples are not installed with this mpidl (no {package / SHIPPED}): "
                "reinstall mpidl from its wheel or source package")


def files(root: Path) -> list[Path]:
    """The example files under `root`, relative to it."""
    return [p.relative_to(root) for pattern in FILES for p in sorted(root.glob(pattern)) if p.is_file()]


def summary(path: Path) -> str:
    """A file's first comment or docstring line: what it is."""
    if path.suffix == ".json":
        return "measured results the studies show (benchmarks/bench_allreduce.py writes them)"
    for line in path.read_text().splitlines():
        text = line.strip().lstrip("#").strip().strip('"').strip()
        if text:
            return text
    return ""


def copy(dest: Path) -> list[Path]:
    """Copy every example into `dest`, keeping its path; refuse before writing anything if one is there."""
    root = source()
    rels = files(root)
    there = [r for r in rels if (dest / r).exists()]
    if there:
        raise BadInput(f"{dest / there[0]}: already exists ({len(there)} of the {len(rels)} example files are "
                       "there): copy into a new or empty folder")
    for rel in rels:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / rel, dest / rel)
    return rels
