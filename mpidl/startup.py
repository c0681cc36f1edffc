"""A process's start and exit without Python's cyclic collector rescanning torch.

Importing torch and its compiler (torch.optim imports `torch._dynamo` at the first step) makes
about 450,000 objects the collector tracks, and they live as long as the process. It scans all of
them each time the heap has grown by a quarter while they load, and again while the interpreter
shuts down: 1.3 of the 3.3 CPU-seconds a rank of a tiny 2-rank `mpidl train` took here, and a
third of its wall time (benchmarks/bench_startup.py). So a command that trains loads them with
the collector off and then freezes them (`gc.freeze()`: never scanned again; what is made later
is collected as usual), and the process freezes what is left when it exits, before the
interpreter's shutdown would scan it (atexit handlers registered later still run first; Python
makes no promise to finalise objects still alive at exit either way).

Only in a process mpidl owns (`claim()`: the `mpidl` command, a submitit task, `mpidl check`'s
ranks): a freeze lasts as long as the process, and a caller's process (a notebook, a test run
calling `mpidl.cli.main`) keeps its collector as it was. `MPIDL_GC_FREEZE=0` keeps Python's
default everywhere (the benchmark's reference).
"""
from __future__ import annotations

import atexit
import gc
import importlib
import os

ENV = "MPIDL_GC_FREEZE"

# What a training rank imports anyway, the compiler included (torch.optim, at the first step).
TRAINING = ("torch", "torch._dynamo")

_claimed = False


def claim() -> None:
    """This process is mpidl's own: from now on `load()` applies, and what lives at exit is frozen."""
    global _claimed
    if not _claimed and os.environ.get(ENV, "1") != "0":
        atexit.register(gc.freeze)  # handlers registered later (a user's) still run before it
        _claimed = True


def load(*modules: str) -> None:
    """In mpidl's own process: import `modules` with the collector off, then freeze every object made
    so far. Elsewhere nothing (the caller imports them as usual when it needs them)."""
    if not _claimed:
        return
    was_on = gc.isenabled()
    gc.disable()
    try:
        for name in modules:
            importlib.import_module(name)
    finally:
        gc.freeze()
        if was_on:
            gc.enable()
