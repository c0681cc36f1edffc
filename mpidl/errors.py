"""The errors that end a job with one line and no traceback, and their exit codes."""
from __future__ import annotations

from typing import Optional

EXIT_BAD_INPUT = 2
# The progress watchdog ended the job: a rank made no progress for watchdog_s (mpidl/watchdog.py).
EXIT_STUCK = 4


class Fault(Exception):
    """Something outside the user's input went wrong in a way one line explains (a full disk, a
    lost checkpoint): that line, naming the file, and exit 1 on every rank, no traceback."""


class Diverged(Fault):
    """Training produced a non-finite loss: one line naming the step and the rank, exit 1."""


class BadInput(Exception):
    """A problem with what the user gave us (a spec, a file, a flag).

    The message is one line naming the file, key and value. The job exits with
    status 2 on every rank and prints no traceback.
    `collective` means every rank raised it together (see `World.agree`), so rank 0 alone
    prints it; `origin` is the rank that found it.
    """

    def __init__(self, message: str, *, collective: bool = False, origin: Optional[int] = None):
        super().__init__(message)
        self.collective = collective
        self.origin = origin
