"""Preemption: a signal ends training at a step boundary that all ranks agree on.

SLURM sends the warning signal (`--signal=USR2@90`) or SIGTERM to the ranks of a job about to
be preempted or to reach its time limit, not always to all of them at the same moment. A
handler only sets a flag; at every step boundary the ranks combine their flags with a
non-blocking allreduce (MAX) whose answer is read one step later, so the check adds no
synchronisation point of its own, and all ranks stop after the same step, write one
checkpoint and leave. Outside training SIGTERM keeps the fail-fast abort of `mpidl.init()`.
"""
from __future__ import annotations

import signal
import threading
from typing import Any, Optional

import numpy as np

SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class Preemption:
    """A context in which SIGNALS request a stop; `requested()` says, collectively, whether one did."""

    def __init__(self, world, signals=SIGNALS):
        self.world = world
        self.signals = tuple(signals)
        self.received: Optional[int] = None
        #: the handlers in place before (submitit's, mpidl's fail-fast), to call after the checkpoint
        self.previous: dict[int, Any] = {}
        self._send, self._recv = np.zeros(1, np.int32), np.zeros(1, np.int32)
        self._request: Any = None

    def _on_signal(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self.previous[s] = signal.signal(s, self._on_signal)
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self._request is not None and exc_type is None:
            self._request.Wait()  # every rank has one in flight from the same step
            self._request = None
        for s, h in self.previous.items():
            signal.signal(s, h)

    def requested(self) -> Optional[str]:
        """The name of the signal some rank received, or None; the same answer on every rank.

        Call once per step on every rank. Ranks learn of a signal one check after it arrived.
        """
        if self.world.size == 1:
            return signal.Signals(self.received).name if self.received else None
        from mpi4py import MPI

        agreed = 0
        if self._request is not None:
            self._request.Wait()
            agreed = int(self._recv[0])
        self._send[0] = self.received or 0
        self._request = self.world.comm.Iallreduce(self._send, self._recv, op=MPI.MAX)
        return signal.Signals(agreed).name if agreed else None
