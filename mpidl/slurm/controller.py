"""Talking to SLURM's client commands: every failure becomes one line naming the command.

The local test cluster has no accounting database, so `sacct` is never used: a job's state
comes from `scontrol show job` while the controller still knows the job (MinJobAge after it
ends), and after that from the record the job leaves in its own log (see `mpidl.slurm.watch`).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Optional

from mpidl.errors import BadInput

# States after which a job runs no more (unless someone requeues it by hand).
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED", "SPECIAL_EXIT", "REVOKED"}

# What an sbatch refusal mentions -> the spec key to name.
_REFUSAL_KEYS = [
    ("partition", "slurm.partition"), ("account", "slurm.account"), ("qos", "slurm.qos"),
    ("gres", "slurm.gpus_per_node"), ("gpu", "slurm.gpus_per_node"), ("time limit", "slurm.time"),
    ("feature", "slurm.constraint"), ("constraint", "slurm.constraint"), ("memory", "slurm.mem"),
    ("node configuration", "slurm.nodes / tasks_per_node / cpus_per_task"),
    ("node count", "slurm.nodes"),
]


def require(command: str) -> str:
    """The command's path, or BadInput naming it."""
    path = shutil.which(command)
    if path is None:
        raise BadInput(f"{command}: not found on PATH (mpidl submit needs the SLURM client commands; "
                       "--dry-run writes the script without them)")
    return path


def _run(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise BadInput(f"{cmd[0]}: not found on PATH") from None
    except subprocess.TimeoutExpired:
        raise BadInput(f"{' '.join(cmd[:2])}: no answer within {timeout:.0f} s (is the SLURM controller up?)") from None


def _first_line(text: str) -> str:
    """The line that says what went wrong, without sbatch's own prefixes."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()] or lines
    line = errors[0] if errors else "no output"
    return re.sub(r"^(sbatch|scontrol|sinfo)?:?\s*(error:\s*)?", "", line)


def controller_answers() -> bool:
    """True when a SLURM controller answers `scontrol ping` (quick even when it is down)."""
    if shutil.which("scontrol") is None:
        return False
    try:
        out = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return False
    return out.returncode == 0 and " UP" in out.stdout


def require_controller() -> None:
    """BadInput unless sbatch and scontrol exist and the controller answers."""
    require("sbatch")
    require("scontrol")
    out = _run(["scontrol", "ping"], timeout=15)
    if out.returncode != 0 or " UP" not in out.stdout:
        said = (out.stdout + out.stderr).strip().splitlines()
        said = [ln for ln in said if "fatal" in ln] or said  # no configuration: the last line says so
        raise BadInput(f"scontrol ping: the SLURM controller does not answer ({said[0] if said else 'no output'})")


def test_only(script: Path, slurm: Optional[Any] = None) -> str:
    """`sbatch --test-only SCRIPT`: the controller's answer in one line; BadInput on refusal,
    naming the spec key (and its value, from `slurm`, the spec's section) the refusal is
    about when it can be told."""
    out = _run(["sbatch", "--test-only", str(script)])
    text = (out.stderr + out.stdout).strip()
    if out.returncode == 0:
        lines = [ln for ln in text.splitlines() if "to start at" in ln] or text.splitlines()[-1:]
        return re.sub(r"^sbatch:\s*", "", lines[0]) if lines else "accepted"
    reason = _first_line(text)
    low = reason.lower()
    key = next((k for word, k in _REFUSAL_KEYS if word in low), None)
    if "unable to contact" in low or "connect failure" in low:
        raise BadInput(f"sbatch --test-only: the SLURM controller does not answer ({reason})")
    where = f"{key}: " if key else ""
    field = key.removeprefix("slurm.") if key else None
    if slurm is not None and field is not None and hasattr(slurm, field):
        where = f"{key} = {json.dumps(getattr(slurm, field))}: "
    raise BadInput(f"{where}the controller refused the job (sbatch --test-only: {reason})")


def submit(script: Path) -> str:
    """`sbatch --parsable SCRIPT` -> the job id."""
    out = _run(["sbatch", "--parsable", str(script)], timeout=120)
    if out.returncode != 0:
        raise BadInput(f"sbatch {script}: {_first_line(out.stderr + out.stdout)}")
    return out.stdout.strip().split(";")[0]


def node_cpus(partition: Optional[str]) -> Optional[int]:
    """CPUs of the smallest node in the partition (the default one when None), or None."""
    if shutil.which("sinfo") is None:
        return None
    cmd = ["sinfo", "-h", "-o", "%c"] + (["-p", partition] if partition else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return None
    counts = [int(x) for x in re.findall(r"\d+", out.stdout)]
    return min(counts) if out.returncode == 0 and counts else None


def show_job(job_id: str) -> Optional[dict[str, str]]:
    """`scontrol show job -o ID` as a dict; None once the controller has forgotten the job.

    For an array element give `ARRAYID_INDEX`. Raises BadInput when the controller does not answer.
    """
    out = _run(["scontrol", "show", "job", "-o", job_id], timeout=60)
    text = out.stdout + out.stderr
    if out.returncode != 0:
        if "Invalid job id" in text:
            return None
        raise BadInput(f"scontrol show job {job_id}: {_first_line(text)}")
    line = next((ln for ln in out.stdout.splitlines() if ln.strip()), "")
    # key=value pairs; values may hold spaces only in a few fields we do not read
    return dict(re.findall(r"(\w[\w/:]*)=(\S*)", line))


def requeue(job_id: str) -> None:
    """`scontrol requeue ID`: the job goes back to the queue and runs again from its script."""
    out = _run(["scontrol", "requeue", job_id], timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"scontrol requeue {job_id}: {_first_line(out.stderr + out.stdout)}")
