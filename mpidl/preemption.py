"""Preemption: a signal ends training at a step boundary that all ranks agree on.

SLURM sends the warning signal (`--signal=USR2@90`) or SIGTERM to the ranks of a job about to
be preempted or to reach its time limit, not always to all of them at the same moment. From
`arm()` on (the first thing `mpidl train` does, before the seconds of imports and set-up), a
handler only records the signal; a second SIGTERM after one was recorded ends the job at once
(SLURM's final word, or a user who means it). Training asks at every step boundary: the ranks
combine what they recorded with a non-blocking allreduce (MAX) whose answer is read one step
later, so the check adds no synchronisation point of its own, and all ranks stop after the same
step, write one checkpoint and leave. The same allreduce carries a second flag, "a time-based
checkpoint is due" (`checkpoint.every_minutes`), so ranks whose clocks differ still write it
after the same step. `agreed_now()` asks once, blocking: after set-up, so a
signal that came during the label scan, standardisation or staging stops the job before its
first step, with a checkpoint.

Not armed (a library user who never asked), SIGTERM keeps the fail-fast abort of
`mpidl.init()` outside a `Preemption` context.

After a preemption (`after_preemption`): requeue the job (at most `slurm.requeue_limit` times)
or say why not, the same way on every rank: requeue through the given function (rank 0 only:
`scontrol requeue` for scripts, submitit's own handler under submitit) while SLURM_RESTART_COUNT
is below the limit, otherwise leave with EXIT_PREEMPTED and a line that says how to continue.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from typing import Any, Callable, Mapping, Optional

import numpy as np

from mpidl import log, watchdog

SIGNALS = (signal.SIGUSR2, signal.SIGTERM)

_received: Optional[int] = None
_armed = False


def _record(signum, frame) -> None:
    global _received
    if _received is None:
        _received = signum
    elif signum == signal.SIGTERM:
        from mpidl.world import abort_on_signal

        abort_on_signal(signum)


def arm(signals=SIGNALS) -> None:
    """Record preemption signals from now on instead of dying of them (main thread only)."""
    global _armed
    if threading.current_thread() is threading.main_thread():
        for s in signals:
            signal.signal(s, _record)
        _armed = True


def armed() -> bool:
    return _armed


def received() -> Optional[int]:
    """The first preemption signal this process received since it was armed, if any."""
    return _received


def reset() -> None:
    """Forget a recorded signal (a process that runs several jobs in turn)."""
    global _received
    _received = None


def _name(signum: int) -> Optional[str]:
    return signal.Signals(signum).name if signum else None


def agreed_now(world) -> Optional[str]:
    """Whether any rank has recorded a signal, the same answer everywhere (a blocking collective)."""
    if world.size == 1:
        return _name(_received or 0)
    from mpi4py import MPI

    with watchdog.waiting("the preemption check"):
        return _name(world.comm.allreduce(_received or 0, op=MPI.MAX))


class Preemption:
    """A context in which SIGNALS request a stop; `requested()` says, collectively, whether one did."""

    def __init__(self, world, signals=SIGNALS):
        self.world = world
        self.signals = tuple(signals)
        #: the handlers in place before (submitit's, mpidl's fail-fast), to call after the checkpoint
        self.previous: dict[int, Any] = {}
        # [the signal recorded, a time-based checkpoint due]: both combined with MAX
        self._send, self._recv = np.zeros(2, np.int32), np.zeros(2, np.int32)
        self._request: Any = None

    @property
    def received(self) -> Optional[int]:
        return _received

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self.previous[s] = signal.signal(s, _record)
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self._request is not None and exc_type is None:
            with watchdog.waiting("the last preemption check"):
                self._request.Wait()  # every rank has one in flight from the same step
            self._request = None
        for s, h in self.previous.items():
            signal.signal(s, h)

    def requested(self) -> Optional[str]:
        """The name of the signal some rank received, or None; the same answer on every rank.

        Call once per step on every rank. Ranks learn of a signal one check after it arrived.
        """
        return self.check()[0]

    def check(self, due: Callable[[], bool] = lambda: False) -> tuple[Optional[str], bool]:
        """(the signal some rank received or None, whether a checkpoint is due), the same on every
        rank: `requested()` with a second flag riding in the same allreduce, for checkpoints
        every so many minutes. Each rank's `due()` reads its own clock; the flag any rank raised
        comes back one check later on all of them, so they checkpoint after the same step.

        `due` is asked after the answer of the previous check: a rank that has just learned of a
        checkpoint (it will write it at this step) sends no flag for the one it already has.
        """
        if self.world.size == 1:
            return _name(_received or 0), bool(due())
        from mpi4py import MPI

        agreed = (0, 0)
        if self._request is not None:
            with watchdog.waiting("the preemption check"):
                self._request.Wait()
            agreed = (int(self._recv[0]), int(self._recv[1]))
        self._send[0] = _received or 0
        self._send[1] = 0 if agreed[1] else int(bool(due()))
        self._request = self.world.comm.Iallreduce(self._send, self._recv, op=MPI.MAX)
        return _name(agreed[0]), bool(agreed[1])


# A job that stopped early with a checkpoint and was not requeued.
EXIT_PREEMPTED = 3


def restart_count(env: Mapping[str, str] = os.environ) -> int:
    """How many times SLURM has requeued this job (SLURM_RESTART_COUNT; 0 on the first run)."""
    value = env.get("SLURM_RESTART_COUNT", "0").strip()
    return int(value) if value.isdigit() else 0


def job_id(env: Mapping[str, str] = os.environ) -> Optional[str]:
    """The id `scontrol requeue` takes: `ARRAY_INDEX` for an array element, else the job id."""
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


def resume_mode(asked: "bool | str", env: Mapping[str, str] = os.environ) -> "bool | str":
    """A requeued job resumes from its newest checkpoint by itself ("auto": fresh when there is
    none; a fingerprint mismatch is BadInput, never a silent restart from zero)."""
    return "auto" if restart_count(env) > 0 else asked


def too_many_restarts(world, limit: int, env: Mapping[str, str] = os.environ) -> int:
    """EXIT_PREEMPTED, after one line on rank 0, when SLURM has restarted this job more than
    `limit` times; else 0. Besides mpidl's own requeues after preemption (at most `limit`),
    SLURM requeues a job that loses a node by itself (`--requeue`): this bounds both together."""
    restarts = restart_count(env)
    if job_id(env) is None or restarts <= limit:
        return 0
    if world.rank == 0:
        sys.stderr.write(f"error: job {job_id(env)} was restarted {restarts} times (preemptions, lost nodes), more "
                         f"than slurm.requeue_limit = {limit}: not continuing; continue with --resume\n")
        sys.stderr.flush()
    return EXIT_PREEMPTED


def after_preemption(world, summary: dict, limit: int, requeue: Optional[Callable[[], None]],
                     env: Mapping[str, str] = os.environ) -> int:
    """Requeue or explain; returns the exit code every rank leaves with (0 once requeued).

    `requeue` runs on rank 0 only; None where the job cannot be requeued (not under SLURM, or
    not asked to).
    """
    signal_name, step = summary["preempted"], summary.get("global_step")
    restarts = restart_count(env)
    said = f"preempted by {signal_name} at step {step} (checkpoint written)"
    if requeue is None:
        reason = "not requeued (mpidl train requeues an sbatch job when given --requeue)"
    elif job_id(env) is None:
        reason = "not requeued (not in a SLURM job)"
    elif restarts >= limit:
        reason = f"not requeued: slurm.requeue_limit = {limit} reached ({restarts} restarts)"
    else:
        # SLURM ends this run with SIGTERM once the job is requeued: leave quietly then, not
        # through the fail-fast abort (the checkpoint is on disk).
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if world.rank != 0:
            return 0
        log.get().warning("%s: requeueing job %s (restart %d of at most %d); it resumes by itself",
                          said, job_id(env), restarts + 1, limit)
        for h in log.get().handlers:
            h.flush()
        try:
            requeue()
            return 0
        except Exception as e:  # e.g. the controller already requeued or ended it
            reason = f"the requeue failed ({str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__})"
    if world.rank == 0:
        sys.stderr.write(f"error: {said}; {reason}; continue with --resume\n")
        sys.stderr.flush()
    return EXIT_PREEMPTED


def scontrol_requeue(env: Mapping[str, str] = os.environ) -> Callable[[], None]:
    """The standalone requeue: rank 0 runs `scontrol requeue $SLURM_JOB_ID` (the job goes back
    to the queue and runs again from its script)."""
    def run() -> None:
        jid = job_id(env)
        assert jid is not None
        out = subprocess.run(["scontrol", "requeue", jid], capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            lines = [ln.strip() for ln in (out.stderr + out.stdout).splitlines() if ln.strip()]
            raise RuntimeError(f"scontrol requeue {jid}: {lines[0] if lines else 'exit ' + str(out.returncode)}")

    return run
