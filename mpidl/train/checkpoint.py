"""Checkpoints: written atomically by rank 0, read back with clear errors and no code run.

A checkpoint file is complete or absent: torch.save into a temporary file in the same
folder, fsync, rename, fsync the folder. Names carry the optimizer step, so the newest is
the one with the highest number.

Reading runs no code: a checkpoint holds tensors and plain values only (`FORMAT` 2), and is
read with `torch.load(weights_only=True)`, which refuses pickled objects. Run folders are
shared on clusters (a distillation teacher, `mpidl quantize`, a colleague's run to resume),
and a pickle can run anything as whoever loads it. A file that holds pickled objects (written
by mpidl before format 2, or planted) is refused in one line naming the object, unless the
user says they trust it: MPIDL_TRUST_CHECKPOINTS=1 (the next checkpoint is written in format 2).
"""
from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Optional

from mpidl import log, watchdog
from mpidl.errors import BadInput, Fault


class Corrupt(BadInput):
    """A checkpoint file that cannot be read (torn, truncated, not a checkpoint at all)."""

PATTERN = re.compile(r"^ckpt-(\d{9})\.pt$")
FORMAT = 2
TRUST_ENV = "MPIDL_TRUST_CHECKPOINTS"


def path_for(folder: Path, step: int) -> Path:
    return folder / f"ckpt-{step:09d}.pt"


def save(folder: Path, step: int, state: dict, keep: int) -> Path:
    """Write `state` atomically as the checkpoint of `step`; keep the newest `keep`."""
    folder.mkdir(parents=True, exist_ok=True)
    final = path_for(folder, step)
    tmp = folder / f".{final.name}.tmp{os.getpid()}"
    import torch  # here, not at the top: `mpidl submit` looks for checkpoints without torch's seconds

    try:
        with watchdog.phase("checkpoint", f"writing {final}"), open(tmp, "wb") as f:
            torch.save({**state, "format": FORMAT}, _Progressing(f))  # type: ignore[arg-type]  # a writable file object
            f.flush()
            # one call that may take long on a shared file system, and cannot say how far it got
            watchdog.mark("checkpoint", f"fsync of {final}", factor=watchdog.LONG)
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException as e:
        tmp.unlink(missing_ok=True)  # never leave a partial file behind
        cause = _os_error(e)  # torch reports a failed write as a RuntimeError around the OSError
        if cause is None:
            raise
        known: dict[Optional[int], str] = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded"}
        what = known.get(cause.errno, cause.strerror)
        raise Fault(f"{final}: cannot write the checkpoint: {what}; free space or set checkpoint.dir elsewhere, "
                    "then continue with --resume") from None
    dfd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    for old in all_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return final


class _Progressing:
    """The checkpoint's file as torch.save writes it, piece by piece: each piece written is
    progress for the watchdog (a slow file system is no hang; one that stops answering is)."""

    def __init__(self, f):
        self.f = f

    def write(self, data) -> int:
        n = self.f.write(data)
        watchdog.touch()
        return n

    def flush(self) -> None:
        self.f.flush()


def all_checkpoints(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if PATTERN.match(p.name)), key=lambda p: p.name)


def latest(folder: Path) -> Optional[Path]:
    found = all_checkpoints(folder)
    return found[-1] if found else None


def trusted() -> bool:
    """Whether the user allows checkpoints that hold pickled objects (MPIDL_TRUST_CHECKPOINTS=1)."""
    return os.environ.get(TRUST_ENV, "") not in ("", "0")


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def load(path: Path, fingerprint: Optional[str]) -> dict:
    """Read a checkpoint; BadInput if it is corrupt, holds pickled objects (unless trusted) or
    was written by a different job (fingerprint None: any job's, e.g. a distillation teacher)."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a damaged file
        found = _GLOBAL.search(str(e))
        if found is None:
            raise Corrupt(f"{path}: corrupt checkpoint ({type(e).__name__}: {_first_line(e)})") from None
        if not trusted():
            raise BadInput(f"{path}: holds a pickled object ({found.group(1)}) that loading would run: a checkpoint "
                           f"of mpidl before format {FORMAT}, or not mpidl's; if you trust whoever wrote it, "
                           f"set {TRUST_ENV}=1") from None
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:
            raise Corrupt(f"{path}: corrupt checkpoint ({type(e2).__name__}: {_first_line(e2)})") from None
        log.get().warning("%s: loaded with pickled objects (%s=1)", path, TRUST_ENV)
    if not isinstance(state, dict) or "fingerprint" not in state or "model" not in state:
        raise Corrupt(f"{path}: not an mpidl checkpoint")
    if fingerprint is not None and state["fingerprint"] != fingerprint:
        raise BadInput(f"{path}: written by a different job (spec fingerprint {state['fingerprint']}, "
                       f"this job {fingerprint}): model, optimizer, schedule or data settings changed; "
                       "use another checkpoint.dir or the original spec")
    return _upgrade(state)


def load_newest(folder: Path, fingerprint: Optional[str]) -> Optional[tuple[Path, dict]]:
    """The newest checkpoint in `folder` that reads, with its path; None when there is none.

    A torn newest file (a node lost while the file system caught up, a full disk on another
    writer) falls back to the next older one with a warning: `keep` exists for this. A
    checkpoint of another job or with pickled objects is an error, not skipped.
    """
    found = all_checkpoints(folder)
    first: Optional[Corrupt] = None
    for path in reversed(found):
        try:
            state = load(path, fingerprint)
        except Corrupt as e:
            first = first or e
            log.get().warning("%s; trying the one before it", e)
            continue
        if first is not None:
            log.get().warning("resuming from %s, the newest checkpoint that reads", path.name)
        return path, state
    if first is not None:
        raise first
    return None


def _upgrade(state: dict) -> dict:
    """A trusted checkpoint from before format 2 in today's shape (numpy's RNG state as plain values)."""
    rng = state.get("rng")
    if isinstance(rng, dict) and isinstance(rng.get("numpy"), tuple):
        from mpidl.train.rng import numpy_state_plain

        state = {**state, "rng": {**rng, "numpy": numpy_state_plain(rng["numpy"])}}
    return state


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[0][:120] if lines else ""


def _os_error(e: Optional[BaseException]) -> Optional[OSError]:
    """The OSError behind `e` (itself, or what it was raised from), if any."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError):
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None
