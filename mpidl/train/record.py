"""The run's record, written by rank 0: metrics.jsonl, a progress line, summary.json."""
from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

import mpidl
from mpidl.world import SINGLE


class Progress:
    """A live, rewritten line on a terminal; otherwise a plain line per log interval.

    OpenMPI gives ranks a pty even when mpirun's own output goes to a file or a pipe, so under
    a launcher a rank cannot tell a terminal from a CI log: there it writes plain lines, unless
    MPIDL_PROGRESS=bar asks for the live line (MPIDL_PROGRESS=lines forces plain lines anywhere).
    """

    def __init__(self, enabled: bool, launcher: str):
        self.enabled = enabled
        choice = os.environ.get("MPIDL_PROGRESS", "")
        self.tty = choice == "bar" or (choice != "lines" and launcher == SINGLE and sys.stdout.isatty()
                                       and not os.environ.get("CI") and os.environ.get("TERM", "dumb") != "dumb")

    def show(self, text: str, final: bool = False) -> None:
        if not self.enabled:
            return
        if self.tty:
            sys.stdout.write("\r\033[K" + text + ("\n" if final else ""))
        else:
            sys.stdout.write(text + "\n")
        sys.stdout.flush()


def versions() -> dict:
    out: dict[str, Optional[str]] = {"python": platform.python_version(), "torch": torch.__version__,
                                     "numpy": np.__version__, "mpidl": mpidl.__version__}
    for mod in ("h5py", "mpi4py", "horovod"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = None
    return out


class Recorder:
    """Rank 0 writes; every rank may call (the others do nothing)."""

    def __init__(self, world, run_dir: Path, append: bool):
        self.run_dir = run_dir
        self.enabled = world.rank == 0
        self.progress = Progress(self.enabled, world.launcher)
        self._file = None
        if self.enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(run_dir / "metrics.jsonl", "a" if append else "w")

    def write(self, record: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def show(self, text: str, final: bool = False) -> None:
        self.progress.show(text, final)

    def finish(self, summary: Optional[dict]) -> None:
        """Close the metrics file and write summary.json atomically."""
        if not self.enabled:
            return
        if self._file is not None:
            self._file.close()
            self._file = None
        if summary is not None:
            tmp = self.run_dir / "summary.json.tmp"
            tmp.write_text(json.dumps(summary, indent=2) + "\n")
            os.replace(tmp, self.run_dir / "summary.json")
