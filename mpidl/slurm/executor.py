"""submitit's SlurmExecutor, given the spec's `slurm:` section.

One submitit task per rank: submitit writes the sbatch script, pickles the callable
(`mpidl.slurm.task.TrainTask`) and runs it in every task; each task builds its World from
SLURM/MPI as `mpidl train` does. What submitit does not do, mpidl adds through submitit's
own parameters: `srun --mpi=pmix` (srun_args), the warning signal and `--requeue`
(additional_parameters), the environment, the venv check and the mpirun launcher (setup
lines), and the exit record (teardown lines).
"""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, Optional

from submitit import SlurmExecutor

from mpidl.slurm.script import Plan, exit_record, forward_function, mpirun_line, sh, venv_check


class MpidlSlurmExecutor(SlurmExecutor):
    """SlurmExecutor whose launch line can be `mpirun` inside the allocation.

    Under mpirun every rank inherits the batch shell's SLURM_PROCID=0, while submitit names a
    task's pickles and logs by SLURM_PROCID; `mpidl.slurm.rank` sets it from the MPI rank
    before handing over to submitit.
    """

    launcher: str = "srun"
    per_node: Optional[int] = None  # ranks a node runs, said on the launch line (a node range)

    @classmethod
    def affinity(cls) -> int:
        # submitit refuses to build its executor where srun is missing; a dry run needs none,
        # and `mpidl submit` checks for sbatch itself before it submits.
        return 2

    @property
    def _submitit_command_str(self) -> str:
        if self.launcher == "srun":
            return super()._submitit_command_str
        program = " ".join([self.python, "-u -m mpidl.slurm.rank", shlex.quote(str(self.folder))])
        return f"launch {mpirun_line(program, self.per_node)}"


def parameters(plan: Plan) -> dict[str, Any]:
    """submitit's parameters for the plan (its names; the rest through additional_parameters)."""
    s = plan.slurm
    python = Path(plan.venv) / "bin" / "python"
    setup = [f"export SUBMITIT_PREEMPT_SIGNAL={s.signal}"]  # the signal submitit's handler waits for
    if s.setup:
        setup += ["# the spec's slurm.setup", *s.setup]
    setup += [*plan.environment(), f"PYTHON={sh(python)}"]
    setup += venv_check("PYTHON", "this virtual environment (set slurm.venv)")
    if s.launcher == "mpirun":
        setup += forward_function(s.signal)
    extra: dict[str, Any] = {"signal": plan.signal_option, "requeue": True, "time": s.time}
    if s.node_range:  # see Plan.resources: CPUs per node, no task count; the launch line places ranks
        extra["mincpus"] = s.ranks_per_node * (plan.cpus_per_task or 1)
    if s.mem is not None:
        extra["mem"] = s.mem  # as written: submitit's mem_gb would convert
    extra.update(s.sbatch)
    params: dict[str, Any] = {
        "job_name": plan.job_name,
        "nodes": s.nodes,
        "ntasks_per_node": None if s.node_range else s.ranks_per_node,
        "time": plan.time_minutes,  # submitit's own timeout bookkeeping; the text above is what sbatch reads
        "signal_delay_s": s.signal_lead_s,
        "setup": setup,
        "teardown": exit_record(),
        "additional_parameters": extra,
    }
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(s, key) is not None:
            params[key] = getattr(s, key)
    if s.gpus_per_node:
        params["gpus_per_node"] = s.gpus_per_node
    if plan.cpus_per_task is not None:
        params["cpus_per_task"] = plan.cpus_per_task
    if s.exclusive:
        params["exclusive"] = True
    if s.launcher == "srun":
        params["srun_args"] = ["--mpi=pmix", *([f"--ntasks-per-node={s.ranks_per_node}"] if s.node_range else [])]
    else:
        params["use_srun"] = False
    return params


def make(plan: Plan, folder: Path) -> MpidlSlurmExecutor:
    """An executor whose jobs keep their scripts, pickles and logs in `folder`."""
    python = Path(plan.venv) / "bin" / "python"
    ex = MpidlSlurmExecutor(folder, max_num_timeout=plan.slurm.requeue_limit, python=shlex.quote(str(python)))
    ex.launcher = plan.slurm.launcher
    ex.per_node = plan.slurm.ranks_per_node if plan.slurm.node_range else None
    ex.update_parameters(**parameters(plan))
    return ex


def script_text(executor: MpidlSlurmExecutor, array: int = 0) -> str:
    """The exact sbatch script `submit` (array > 1: `submit_array`) will write.

    submitit has no public dry run; this is the text its Slurm executor produces for the
    submission file (the same call it makes when it submits).
    """
    if array > 1:
        copy = MpidlSlurmExecutor(executor.folder, executor.max_num_timeout, python=executor.python)
        copy.launcher, copy.per_node = executor.launcher, executor.per_node
        copy.update_parameters(**executor.parameters)
        copy.parameters["map_count"] = array
        return copy._make_submission_file_text(executor._submitit_command_str, "dry-run")
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")
