"""Checkpoints: written atomically by rank 0, read back with clear errors.

A checkpoint file is complete or absent: torch.save into a temporary file in the same
folder, fsync, rename, fsync the folder. Names carry the optimizer step, so the newest is
the one with the highest number.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

import torch

from mpidl.errors import BadInput

PATTERN = re.compile(r"^ckpt-(\d{9})\.pt$")


def path_for(folder: Path, step: int) -> Path:
    return folder / f"ckpt-{step:09d}.pt"


def save(folder: Path, step: int, state: dict, keep: int) -> Path:
    """Write `state` atomically as the checkpoint of `step`; keep the newest `keep`."""
    folder.mkdir(parents=True, exist_ok=True)
    final = path_for(folder, step)
    tmp = folder / f".{final.name}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    dfd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    for old in all_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return final


def all_checkpoints(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if PATTERN.match(p.name)), key=lambda p: p.name)


def latest(folder: Path) -> Optional[Path]:
    found = all_checkpoints(folder)
    return found[-1] if found else None


def load(path: Path, fingerprint: Optional[str]) -> dict:
    """Read a checkpoint; BadInput if it is corrupt or was written by a different job
    (fingerprint None: any job's, e.g. a distillation teacher)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for a damaged file
        raise BadInput(f"{path}: corrupt checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if not isinstance(state, dict) or "fingerprint" not in state or "model" not in state:
        raise BadInput(f"{path}: not an mpidl checkpoint")
    if fingerprint is not None and state["fingerprint"] != fingerprint:
        raise BadInput(f"{path}: written by a different job (spec fingerprint {state['fingerprint']}, "
                       f"this job {fingerprint}): model, optimizer, schedule or data settings changed; "
                       "use another checkpoint.dir or the original spec")
    return state
