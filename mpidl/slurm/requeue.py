"""After a preemption: requeue the job (at most `slurm.requeue_limit` times) or say why not.

The trainer does the part every rank shares: on the warning signal (or SIGTERM) the ranks
finish their step, agree, and rank 0 writes a checkpoint; `train()` then returns with
`summary["preempted"]` naming the signal. What follows is decided here, the same way on every
rank: requeue through the given function (rank 0 only: `scontrol requeue` for standalone
scripts, submitit's own handler under submitit) while SLURM_RESTART_COUNT is below the limit,
otherwise leave with EXIT_PREEMPTED and a line that says how to continue.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Callable, Mapping, Optional

from mpidl import log

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


def resume_mode(asked: bool, env: Mapping[str, str] = os.environ) -> "bool | str":
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
    """The standalone requeue: rank 0 runs `scontrol requeue $SLURM_JOB_ID`."""
    from mpidl.slurm import controller

    def run() -> None:
        jid = job_id(env)
        assert jid is not None
        controller.requeue(jid)

    return run
