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
"""
from __future__ import annotations

import signal
import threading
from typing import Any, Callable, Optional

import numpy as np

from mpidl import watchdog

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
