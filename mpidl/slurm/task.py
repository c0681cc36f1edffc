"""What every rank runs under submitit: `mpidl train` in-process, ready to be requeued.

`TrainTask` follows submitit's checkpoint protocol (as `submitit.helpers.Checkpointable`
does): submitit's signal handler calls `checkpoint()` and pickles what it returns as the
job's new submission before `scontrol requeue`. mpidl lets the trainer own the warning
signal while it trains (every rank finishes its step, rank 0 writes the checkpoint) and
calls submitit's handler itself afterwards, so that the resubmission follows the
checkpoint instead of racing it.
"""
from __future__ import annotations

import signal
from typing import Callable, Optional, Union

from submitit.helpers import DelayedSubmission


class TrainTask:
    """`mpidl train JOB.yaml --set ...` as a submitit callable (one submitit task per rank).

    The spec's text is kept from submission time: a requeued job trains what was validated
    then, even if the file changed since.
    """

    def __init__(self, job_file: str, spec_text: str, overrides: list[str], resume: Union[bool, str] = False,
                 overwrite: bool = False):
        self.job_file = job_file
        self.spec_text = spec_text
        self.overrides = list(overrides)
        self.resume = resume
        self.overwrite = overwrite

    def __call__(self) -> dict:
        from mpidl import preemption, startup
        from mpidl.spec import load_spec
        from mpidl.train.job import run_job

        # submitit installed its handlers before calling us; mpidl takes SIGTERM and the
        # warning signal over (recorded from here on), so keep submitit's to call later.
        handlers = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM)}
        preemption.arm()
        startup.claim()  # submitit's process is the task's own, as `mpidl train`'s is (cli.entry)

        def requeue_with(spec):
            warning = getattr(signal, f"SIG{spec.slurm.signal}")
            return _submitit_requeue(handlers.get(warning), warning)

        _, _, summary, code = run_job(lambda: load_spec(self.job_file, self.overrides, text=self.spec_text),
                                      resume=preemption.resume_mode(self.resume), overwrite=self.overwrite,
                                      requeue_with=requeue_with, bound_restarts=True)
        if code:
            raise SystemExit(code)
        return summary

    def checkpoint(self) -> DelayedSubmission:
        """The resubmission submitit pickles before requeueing: the same job, resuming."""
        return DelayedSubmission(TrainTask(self.job_file, self.spec_text, self.overrides, resume="auto"))

    def __repr__(self) -> str:
        return f"TrainTask({self.job_file!r}, overrides={self.overrides!r}, resume={self.resume!r})"


def _submitit_requeue(handler, signum: int) -> Optional[Callable[[], None]]:
    """submitit's checkpoint-and-requeue handler as a call, or None outside submitit.

    On rank 0 it calls `checkpoint()`, pickles the result, runs `scontrol requeue` and exits;
    it counts a signal in the last fifth or the last 10 minutes of the time limit, whichever
    is longer (any signal under a limit below 10 minutes), against the executor's
    max_num_timeout, which mpidl sets to requeue_limit.
    """
    if getattr(handler, "__name__", "") != "checkpoint_and_try_requeue":
        return None
    return lambda: handler(signum, None)
