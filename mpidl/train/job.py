"""A job's whole life on a rank, for `mpidl train` and the submitit task alike.

Torch is imported once the spec is read: a job spec with a typo fails in a fraction of a second.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union

import mpidl
from mpidl import preemption, startup
from mpidl.spec import JobSpec

if TYPE_CHECKING:
    from mpidl.train.callbacks import Callback


def run_job(load: Callable[[], JobSpec], *, resume: Union[bool, str] = False, overwrite: bool = False,
            stop_at: Optional[int] = None,
            requeue_with: Callable[[JobSpec], Optional[Callable[[], None]]] = lambda s: None,
            callbacks: Sequence[Callback] = (), bound_restarts: bool = False):
    """A job's whole life on this rank, for `mpidl train` and for the submitit task alike: the
    spec loaded (the same one-line error on every rank), trained, and after a preemption requeued
    through `requeue_with(spec)` or left with exit 3. Returns (world, spec, summary, exit code).
    Call `preemption.arm()` first (the caller may keep handlers of its own before). `bound_restarts`: a
    job SLURM restarted more than slurm.requeue_limit times leaves with exit 3 before training."""
    world = mpidl.init()
    spec = world.agree(load)
    # SLURM requeues a job that lost a node by itself: with mpidl's own requeues, at most the limit.
    if bound_restarts and (code := preemption.too_many_restarts(world, spec.slurm.requeue_limit)):
        return world, spec, {}, code
    startup.load(*startup.TRAINING)  # torch, once the spec is read (a typo fails fast); see mpidl/startup.py
    from mpidl.train.trainer import train

    summary = train(spec, resume=resume, stop_at=stop_at, overwrite=overwrite, callbacks=callbacks)
    code = 0
    if summary.get("preempted"):
        code = preemption.after_preemption(world, summary, spec.slurm.requeue_limit, requeue_with(spec))
    return world, spec, summary, code
