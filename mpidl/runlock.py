"""One job at a time in a run folder: an exclusive lock file that names its holder.

Two jobs in one run folder (a job submitted twice, a sweep started twice) would truncate each
other's metrics, prune each other's checkpoints and resume from each other's state. The first
to arrive creates `RUN/mpidl.lock` (O_EXCL: atomic, also on NFS v3+ and Lustre) holding its
SLURM job id, host, pid and the pid's start time; it is removed when the run ends.

A later arrival reads the holder. The same SLURM job (requeued, or a later step of it) takes
the lock over silently. A holder known to be gone takes a warning and is taken over: on this
host, its pid is dead or now another process (start times differ); on another host, SLURM
says its job is no longer running. Otherwise the holder is live, or cannot be told from live
(another host, no SLURM to ask): one line naming it and the file to remove, exit 2.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from mpidl import log
from mpidl.errors import BadInput

NAME = "mpidl.lock"
# squeue's states of a job that still holds its resources or will run again
LIVE_STATES = {"PENDING", "RUNNING", "SUSPENDED", "COMPLETING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD",
               "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED"}


@dataclass(frozen=True)
class Holder:
    job: Optional[str]      # SLURM_JOB_ID, or None outside SLURM
    host: str
    pid: int
    started: Optional[int]  # the pid's start time in clock ticks since boot (tells a reused pid)
    since: str

    @classmethod
    def me(cls) -> "Holder":
        pid = os.getpid()
        return cls(os.environ.get("SLURM_JOB_ID") or None, socket.gethostname(), pid, _start_time(pid),
                   time.strftime("%Y-%m-%d %H:%M:%S"))

    def describe(self) -> str:
        job = f"SLURM job {self.job}, " if self.job else ""
        return f"{job}pid {self.pid} on {self.host}, since {self.since}"


def _start_time(pid: int) -> Optional[int]:
    """The process's start time (field 22 of /proc/PID/stat), None where there is no /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(text[text.rindex(")") + 2:].split()[19])


def _read(path: Path) -> Optional[Holder]:
    try:
        return Holder(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None  # torn or foreign: a holder that crashed while writing it


def _slurm_job_state(job: str) -> Optional[str]:
    """squeue's state of `job`, "" when SLURM no longer knows it, None when SLURM cannot be asked."""
    try:
        r = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode == 0:
        return r.stdout.strip()
    return "" if "Invalid job id" in r.stderr else None


def gone(holder: Holder, me: Holder) -> Optional[str]:
    """Why `holder` is known to have ended (it may be taken over), or None when it may be alive."""
    if holder.host == me.host:
        if holder.pid == me.pid:
            return "this process"
        started = _start_time(holder.pid)
        if started is None and not Path(f"/proc/{holder.pid}").exists():
            try:
                os.kill(holder.pid, 0)
            except ProcessLookupError:
                return "its process has ended"
            except PermissionError:
                return None
            return None
        if started is None:
            return "its process has ended"
        if holder.started is not None and started != holder.started:
            return "its pid now belongs to another process"
        return None
    if holder.job:
        state = _slurm_job_state(holder.job)
        if state == "" or (state and state.split()[0] not in LIVE_STATES):
            return f"SLURM job {holder.job} is {state.split()[0].lower() if state else 'no longer known'}"
    return None


def check_free(run_dir: Path) -> None:
    """BadInput when a live job holds the run folder's lock (`mpidl submit` asks before submitting)."""
    path = Path(run_dir) / NAME
    holder = _read(path) if path.exists() else None
    me = Holder.me()
    if holder is not None and not (me.job is not None and holder.job == me.job) and not gone(holder, me):
        raise BadInput(_in_use(path, holder))


def _in_use(path: Path, holder: Holder) -> str:
    return (f"{path.parent}: in use by {holder.describe()}: wait for it to end, or set another output or name "
            f"(if that job is gone, remove {path})")


class RunLock:
    """The lock of one run folder, held by this process (rank 0) from `acquire` to `release`."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / NAME
        self.me = Holder.me()
        self.held = False

    def acquire(self) -> "RunLock":
        """Take the lock; BadInput naming the holder when another live job has it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(asdict(self.me)) + "\n"
        for _ in range(3):  # lost races against another taker: read the winner again
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = _read(self.path)
                if holder is None:
                    why = "its lock file is empty or unreadable"
                elif self.me.job is not None and holder.job == self.me.job:
                    why = ""  # this job again (requeued): ours
                else:
                    why = gone(holder, self.me) or ""
                    if not why:
                        raise BadInput(_in_use(self.path, holder)) from None
                if why:
                    log.get().warning("%s: taking over the lock of %s (%s)", self.path.parent,
                                      holder.describe() if holder else "an earlier run", why)
                if _read(self.path) == holder:  # not already taken over by another arrival
                    self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(text)
            self.held = True
            return self
        raise BadInput(f"{self.path}: another job keeps taking this run folder's lock; give this run another output")

    def release(self) -> None:
        """Remove the lock if it is still this process's (a takeover may have replaced it)."""
        if not self.held:
            return
        self.held = False
        holder = _read(self.path)
        if holder is not None and (holder.host, holder.pid, holder.started) == (self.me.host, self.me.pid,
                                                                                 self.me.started):
            self.path.unlink(missing_ok=True)
