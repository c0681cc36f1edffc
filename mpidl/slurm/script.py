"""The sbatch script: resources from the spec's `slurm:` section, then the launch line.

`Plan` resolves a job spec into what a script needs; `standalone(plan)` writes a plain
script (`#SBATCH` lines, setup lines, `srun --mpi=pmix .venv/bin/mpidl train JOB.yaml ...`),
and `mpidl.slurm.executor` gives submitit the same resources and the same shell pieces.

Quoting: every value a user supplied (job name, paths, `--set` values, environment values)
is quoted with `shlex.quote`, which SLURM's `#SBATCH` parser reads back the same way; values
that an `#SBATCH` line cannot carry (newlines, backslashes) are refused when the spec is
read. Setup lines are shell by design and are written as given. No user value goes into a
comment (a newline there would end the comment).
"""
from __future__ import annotations

import json
import math
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from mpidl.errors import BadInput
from mpidl.spec import JobSpec, SlurmSpec, sbatch_problem

# The line the batch shell writes last: the job's own record of how it ended, read by
# `mpidl submit --wait` when the controller has forgotten the job (no accounting database).
EXIT_RECORD = "[mpidl] job step exit status"

Option = Union[str, int, bool]


def sh(value: Union[str, int, Path]) -> str:
    """One shell word that arrives as `value`, whatever it holds."""
    return shlex.quote(str(value))


def shown_path(path: Union[str, Path], base: Path) -> str:
    """`path` relative to `base` when it lies below it (scripts stay free of machine paths),
    else absolute."""
    p = Path(os.path.abspath(path))
    try:
        return str(p.relative_to(os.path.abspath(base)))
    except ValueError:
        return str(p)


def sbatch_safe(key: str, value: str) -> str:
    """BadInput when `value` cannot pass through an #SBATCH line (see `mpidl.spec.sbatch_problem`)."""
    problem = sbatch_problem(value)
    if problem:
        raise BadInput(f"{key} = {json.dumps(value)}: {problem}")
    return value


@dataclass(frozen=True)
class Plan:
    """A job spec resolved into what its sbatch script says.

    job_file, venv: as the script names them (relative to the submit directory where they lie
    below it). node_cpus: the node's CPUs as the controller reports them, used when the spec
    gives neither cpus_per_task nor cpus_per_node.
    """

    spec: JobSpec
    job_file: str
    overrides: tuple[str, ...] = ()
    venv: str = ".venv"
    node_cpus: Optional[int] = None
    train_flags: tuple[str, ...] = ()   # --resume / --overwrite, passed on to `mpidl train`

    @property
    def slurm(self) -> SlurmSpec:
        return self.spec.slurm

    @property
    def job_name(self) -> str:
        s = self.slurm
        return s.job_name if s.job_name is not None else sbatch_safe("name (the job name; or set slurm.job_name)",
                                                                   self.spec.name)

    @property
    def cpus_per_task(self) -> Optional[int]:
        own = self.slurm.cpus_for_each_task()
        if own is None and self.node_cpus:
            return max(1, self.node_cpus // self.slurm.ranks_per_node)
        return own

    @property
    def time_minutes(self) -> int:
        return math.ceil(self.slurm.time_seconds / 60)

    @property
    def signal_option(self) -> str:
        # srun: SLURM signals every task itself. mpirun: the ranks are not a job step SLURM
        # can signal, so the batch shell gets it (B:) and passes it on.
        where = "B:" if self.slurm.launcher == "mpirun" else ""
        return f"{where}{self.slurm.signal}@{self.slurm.signal_lead_s}"

    def resources(self) -> dict[str, Option]:
        """The #SBATCH options that ask for the job's resources, in the order a reader expects."""
        s = self.slurm
        opts: dict[str, Option] = {"job-name": self.job_name}
        for key in ("partition", "account", "qos"):
            if getattr(s, key) is not None:
                opts[key] = getattr(s, key)
        opts["nodes"] = s.nodes
        if s.node_range:
            # No task count in the allocation: SLURM fixes a job's task count when it first starts,
            # and a job requeued after losing a node would then wait for that node to come back
            # (seen with SLURM 22.05). Each node gets the CPUs of its ranks instead, and the launch
            # line places the ranks (srun --ntasks-per-node, mpirun -npernode).
            opts["mincpus"] = s.ranks_per_node * (self.cpus_per_task or 1)
        else:
            opts["ntasks-per-node"] = s.ranks_per_node
        if s.gpus_per_node:
            opts["gpus-per-node"] = s.gpus_per_node
        if self.cpus_per_task is not None:
            opts["cpus-per-task"] = self.cpus_per_task
        if s.mem is not None:
            opts["mem"] = s.mem
        opts["time"] = s.time
        if s.constraint is not None:
            opts["constraint"] = s.constraint
        if s.exclusive:
            opts["exclusive"] = True
        opts["signal"] = self.signal_option
        opts["requeue"] = True
        opts.update(s.sbatch)
        return opts

    def environment(self) -> list[str]:
        """export lines: threads per rank, then the spec's env (values quoted)."""
        lines = ['export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"']
        lines += [f"export {k}={sh(v)}" for k, v in self.slurm.env.items()]
        return lines


def sbatch_line(key: str, value: Option) -> str:
    return f"#SBATCH --{key}" if value is True else f"#SBATCH --{key}={sh(value)}"


def venv_check(program_var: str, what: str) -> list[str]:
    """Stop with one line and exit 2 when the compute node does not see the environment."""
    return [
        f'if [ ! -x "${program_var}" ]; then',
        f'    echo "error: slurm.venv: ${program_var} not found on $(hostname): the compute nodes must see {what}" >&2',
        "    exit 2",
        "fi",
    ]


def forward_function(signal: str) -> list[str]:
    """A shell function that runs its arguments in the background and passes the warning
    signal on: SLURM sends it to this shell (B:), whose default action on USR2 or TERM would
    end the job, and mpirun forwards USR1/USR2 (and TERM) to every rank."""
    return [
        f"# SLURM sends SIG{signal} to this shell (--signal=B:...), whose default would be to die of it:",
        "# pass it on to mpirun, which forwards it to every rank.",
        "launch() {",
        f"    trap 'kill -{signal} \"$launched\" 2>/dev/null' {signal}",
        '    "$@" &',
        "    launched=$!",
        '    wait "$launched"; local status=$?',
        '    while kill -0 "$launched" 2>/dev/null; do wait "$launched"; status=$?; done',
        '    return "$status"',
        "}",
    ]


def exit_record() -> list[str]:
    """After the launch line: keep its status, record it in the log, leave with it."""
    return [
        "# The job's own record of how it ended, read by `mpidl submit --wait` once SLURM forgets the job.",
        "status=$?",
        f'echo "{EXIT_RECORD} $status (restart ${{SLURM_RESTART_COUNT:-0}})"',
        'exit "$status"',
    ]


def mpirun_line(program: str, per_node: Optional[int] = None) -> str:
    # mpirun takes the rank count and placement from the allocation; ranks are not bound to
    # one core each (cpus_per_task cores are theirs: data loading, torch threads). A job of a
    # node range says how many ranks a node runs (its allocation counts CPUs, not tasks).
    placement = f"-npernode {per_node} " if per_node else ""
    return f"mpirun --bind-to none {placement}{program}"


def srun_line(program: str, per_node: Optional[int] = None) -> str:
    placement = f"--ntasks-per-node={per_node} " if per_node else ""
    return f"srun --mpi=pmix {placement}{program}"


def standalone(plan: Plan, output: str = "slurm-%j.out") -> str:
    """A plain sbatch script: no pickles, readable, meant to be kept in git and sbatch'ed by hand."""
    s = plan.slurm
    args = " ".join(sh(a) for a in ["train", plan.job_file, "--requeue", *plan.train_flags,
                                     *[x for o in plan.overrides for x in ("--set", o)]])
    body = [f"MPIDL={sh(Path(plan.venv) / 'bin' / 'mpidl')}",
            *venv_check("MPIDL", "this virtual environment (set slurm.venv)"),
            "",
            f"# Every rank trains. On SIG{s.signal}, {s.signal_lead_s} s before the time limit or at preemption, the",
            "# ranks finish their step, rank 0 writes a checkpoint and requeues the job (at most",
            f"# {s.requeue_limit} times); the requeued job resumes from its newest checkpoint by itself."]
    return batch_script(plan, {"open-mode": "append", "output": output}, body, '"$MPIDL" ' + args, [
        "# Written by `mpidl submit --standalone`; submit it from the directory it names files",
        "# from (sbatch runs it there). The spec's slurm: section chose every line above."])


def batch_script(plan: Plan, options: dict[str, Option], body: list[str], program: str, about: list[str],
                 before_launch: Optional[list[str]] = None) -> str:
    """#SBATCH lines (the plan's resources and `options`), `about`, the setup and environment lines,
    `body`, then every rank runs `program` (a shell text, its words quoted) and the exit record."""
    s = plan.slurm
    lines = ["#!/bin/bash"]
    lines += [sbatch_line(k, v) for k, v in {**plan.resources(), **options}.items()]
    lines += ["", *about]
    if s.setup:
        lines += ["", "# setup (the spec's slurm.setup)"] + list(s.setup)
    lines += ["", *plan.environment(), *body, *(before_launch or [])]
    per_node = s.ranks_per_node if s.node_range else None
    if s.launcher == "srun":
        lines.append(srun_line(program, per_node))
    else:
        lines += forward_function(s.signal)
        lines.append(f"launch {mpirun_line(program, per_node)}")
    lines += exit_record()
    return "\n".join(lines) + "\n"
