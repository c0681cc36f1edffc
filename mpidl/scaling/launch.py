"""How a study starts the trainer on p ranks: a small interface, one implementation per launcher.

    launcher = make_launcher(spec.launcher, cores)
    launcher.run(ranks, argv, env=env, cwd=cwd, timeout=s, log=path) -> Finished

`mpirun` runs here, now. A batch launcher (SLURM through `mpidl submit`, one job per size or
an array) plugs in by implementing the same `run`: it must return once the job has ended, with
its exit status, and leave the trainer's files in the run folder named on the command line
(`--set output=...`); the runner reads nothing else.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class Finished:
    returncode: int
    seconds: float
    timed_out: bool
    output_tail: str


class Launcher(Protocol):
    name: str

    def oversubscribed(self, ranks: int) -> bool:
        """More ranks than this machine (or allocation) has cores: figures are marked."""

    def run(self, ranks: int, argv: list[str], *, env: dict, cwd: Path, timeout: float, log: Path) -> Finished:
        ...

    def describe(self) -> dict:
        ...


class MpirunLauncher:
    """`mpirun -np P [--oversubscribe] [args] argv...` on this machine."""

    name = "mpirun"

    def __init__(self, args: list[str], cores: int):
        self.args = list(args)
        self.cores = cores

    def oversubscribed(self, ranks: int) -> bool:
        return ranks > self.cores

    def command(self, ranks: int, argv: list[str]) -> list[str]:
        extra = ["--oversubscribe"] if self.oversubscribed(ranks) else []
        return ["mpirun", "-np", str(ranks), *extra, *self.args, *argv]

    def run(self, ranks: int, argv: list[str], *, env: dict, cwd: Path, timeout: float, log: Path) -> Finished:
        t0 = time.monotonic()
        timed_out = False
        with open(log, "w") as out:
            # A session of its own, so a run past its time is ended with everything it started.
            p = subprocess.Popen(self.command(ranks, argv), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                 start_new_session=True)
            try:
                rc = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    rc = p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    rc = p.wait()
        text = log.read_text(errors="replace")
        return Finished(rc, time.monotonic() - t0, timed_out, text[-4000:])

    def describe(self) -> dict:
        try:
            version = subprocess.run(["mpirun", "--version"], capture_output=True, text=True,
                                     timeout=30).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            version = "unknown"
        return {"name": self.name, "version": version, "args": self.args, "cores": self.cores}


def make_launcher(spec, cores: int) -> Launcher:
    if spec.name == "mpirun":
        return MpirunLauncher(spec.args, cores)
    raise ValueError(f"unknown launcher {spec.name!r}")  # the study schema admits only the names above
