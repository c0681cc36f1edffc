"""The example scripts committed under slurm/, and how to write them again.

    .venv/bin/python -m mpidl.slurm.examples      # rewrite slurm/*.sbatch after a change

tests/test_slurm_scripts.py pins their text: a change to what mpidl writes shows up there
as a diff, to be reviewed and committed with the regenerated files.
"""
from __future__ import annotations

import sys
from pathlib import Path

from mpidl.slurm import executor
from mpidl.slurm.script import Plan, standalone
from mpidl.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]

# file -> (job spec, --set overrides, mode); paths as a checkout names them, submitted from its root
EXAMPLES: dict[str, tuple[str, list[str], str]] = {
    "slurm/demo-cpu.sbatch": ("jobs/demo.yaml", [], "standalone"),
    "slurm/resnet50-2x4gpu.sbatch": ("jobs/gpu-resnet50.yaml", [], "standalone"),
    "slurm/demo-submitit.sbatch": ("jobs/demo.yaml", [], "submitit"),
}
# submitit's scripts name files by absolute path; the example shows them under this stand-in.
SUBMITIT_ROOT = Path("/path/to/mpidl")


def render(root: Path = ROOT) -> dict[str, str]:
    """Each example's text as mpidl writes it today."""
    out = {}
    for name, (job, sets, mode) in EXAMPLES.items():
        spec = load_spec(root / job, sets)
        if mode == "standalone":
            out[name] = standalone(Plan(spec, job, tuple(sets), venv=".venv"))
        else:
            plan = Plan(spec, job, tuple(sets), venv=str(SUBMITIT_ROOT / ".venv"))
            ex = executor.make(plan, SUBMITIT_ROOT / spec.run_dir / "slurm")
            out[name] = executor.script_text(ex).rstrip("\n") + "\n"
    return out


def main() -> int:
    for name, text in render().items():
        (ROOT / name).write_text(text)
        print(f"wrote {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
