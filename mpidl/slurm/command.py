"""`mpidl submit [RESOURCES.yaml] [flags] -- CMD ...`: any command as a SLURM job on every rank.

The resources are a job spec's `slurm:` section, from a YAML file that holds one (and, if it
likes, `name` and `output`), from flags (`--nodes 2 --tasks-per-node 4 --time 30`) or from
`--set slurm.KEY=VALUE`; the same checks as for a job spec apply, and the same controller
checks before anything is submitted. The script is a plain sbatch script (a command is not a
Python object for submitit to pickle):

    #SBATCH lines (the section's, --signal=USR2@90, --requeue, --output=RUN/slurm-%j.out)
    setup lines, the environment, the venv's bin first on PATH
    export MPIDL_REQUEUE=1 MPIDL_REQUEUE_LIMIT=3      # mpidl.Run requeues the job after its checkpoint
    srun --mpi=pmix CMD ...                          # (or mpirun), every word quoted

Every rank gets the warning signal before the time limit or at preemption; a script built on
`mpidl.Run` then checkpoints, requeues the job and resumes by itself; any other script sees the
signal as it would under sbatch (its default action ends it). `--array KEY=V1,V2` gives one
element per value, with `{KEY}` in the command's words replaced (and `{index}`), each element with
its own run folder in MPIDL_OUTPUT (where `mpidl.Run` writes: elements never share a folder).
"""
from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path
from typing import Optional

from mpidl.errors import BadInput
from mpidl.slurm import controller
from mpidl.slurm.cli import FLAGS
from mpidl.slurm.script import Plan, batch_script, sbatch_safe, sh, shown_path
from mpidl.slurm.submit import Prepared, _slug, array_variants, generated_path, private_folder
from mpidl.slurm.watch import Job
from mpidl.spec import CommandSpec, load_command_spec
from mpidl.train.run import OUTPUT_ENV, REQUEUE_ENV, REQUEUE_LIMIT_ENV

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][\w.]*)\}")


def resources(path: Optional[str], flags: dict, sets: list[str], command: list[str]) -> CommandSpec:
    """The job's CommandSpec: the file's, then flags, then --set (later wins)."""
    if not command:
        raise BadInput("mpidl submit: no command after `--` (e.g. -- python train.py)")
    defaults = {"name": _name_of(command)}
    overrides = [f"slurm.{FLAGS[k]}={v}" for k, v in flags.items() if k in FLAGS and v is not None]
    overrides += [f"{k}={v}" for k, v in (("name", flags.get("name")), ("output", flags.get("output"))) if v]
    return load_command_spec(path, overrides + list(sets), defaults)


def _name_of(command: list[str]) -> str:
    """A job name from the command: the script's stem (train.py -> train), else the program's."""
    for word in command[1:] if Path(command[0]).name.startswith("python") else command:
        if word.endswith(".py"):
            return Path(word).stem
    return re.sub(r"[^A-Za-z0-9._-]", "_", Path(command[0]).name) or "job"


def elements(command: list[str], array: list[str]) -> list[tuple[list[str], list[str]]]:
    """(variant, command with its placeholders filled) per array element; one element without --array."""
    if not array:
        if _PLACEHOLDER.search(" ".join(command)):
            used = sorted(set(_PLACEHOLDER.findall(" ".join(command))))
            raise BadInput(f"mpidl submit: the command has {{{used[0]}}} but no --array gives {used[0]}")
        return [([], command)]
    out = []
    for index, variant in enumerate(array_variants(array, "mpidl submit")):
        values = dict(v.split("=", 1) for v in variant)
        values["index"] = str(index)
        unknown = sorted(set(_PLACEHOLDER.findall(" ".join(command))) - set(values))
        if unknown:
            raise BadInput(f"mpidl submit: the command has {{{unknown[0]}}}, which no --array key gives")
        unused = [k for k in values if k != "index" and "{" + k + "}" not in " ".join(command)]
        if unused:
            raise BadInput(f"--array {unused[0]}: the command has no {{{unused[0]}}} to put its values in")
        out.append((variant, [_PLACEHOLDER.sub(lambda m: values[m.group(1)], w) for w in command]))
    return out


def script(plan: Plan, spec: CommandSpec, runs: list[tuple[list[str], list[str]]], cwd: Path,
           venv: Path) -> str:
    """The sbatch script of the command (an array: one `case` branch per element)."""
    s = spec.slurm
    run_dir = shown_path(spec.run_dir, cwd)
    sbatch_safe("output (the run folder, where the logs go)", run_dir)
    options: dict = {"open-mode": "append"}
    if len(runs) > 1:
        options["array"] = f"0-{len(runs) - 1}"
        options["output"] = f"{run_dir}/slurm-%A_%a.out"
    else:
        options["output"] = f"{run_dir}/slurm-%j.out"
    python = venv / "bin" / "python"
    body = [f'export PATH={sh(str(venv / "bin"))}:"$PATH"  # the command finds the venv\'s python first',
            f"PYTHON={sh(python)}", *_venv_check(),
            "# Open MPI ranks give their core away while they wait (mpidl.init does the same; a plain",
            "# Horovod script's background thread would otherwise spin beside training: docs/training.md)",
            'export OMPI_MCA_mpi_yield_when_idle="${OMPI_MCA_mpi_yield_when_idle:-1}"',
            "# A script on mpidl.Run checkpoints on the warning signal, then requeues this job itself.",
            f"export {REQUEUE_ENV}=1 {REQUEUE_LIMIT_ENV}={s.requeue_limit}"]
    about = ["# Written by `mpidl submit -- CMD`: every rank runs the command. Submit it from the",
             "# directory it names files from (sbatch runs it there)."]
    if len(runs) == 1:
        program = " ".join(sh(w) for w in runs[0][1])
        return batch_script(plan, options, body, program, about)
    branches = ['case "$SLURM_ARRAY_TASK_ID" in']
    for i, (variant, words) in enumerate(runs):
        out = sh(f"{run_dir}/{i}-{_slug(variant)}")
        branches.append(f"    {i}) set -- {' '.join(sh(w) for w in words)}; export {OUTPUT_ENV}={out} ;;")
    branches += ['    *) echo "error: no array element $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;', "esac"]
    return batch_script(plan, options, body, '"$@"', about, before_launch=branches)


def _venv_check() -> list[str]:
    return ['if [ ! -x "$PYTHON" ]; then',
            '    echo "error: slurm.venv: $PYTHON not found on $(hostname): the compute nodes must see this '
            'virtual environment (set slurm.venv)" >&2',
            "    exit 2", "fi"]


def prepare(resources_file: Optional[str], flags: dict, sets: list[str], command: list[str], *,
            array: list[str], cwd: Path, venv: Optional[str], ask_controller: bool = True) -> tuple[Prepared, list]:
    """Validate everything and build the script (nothing written or submitted)."""
    spec = resources(resources_file, flags, sets, command)
    runs = elements(command, array)
    node_cpus = None
    if ask_controller and spec.slurm.cpus_for_each_task() is None and controller.controller_answers():
        node_cpus = controller.node_cpus(spec.slurm.partition)
    venv_path = Path(spec.slurm.venv or venv or sys.prefix).absolute()
    plan = Plan(spec, " ".join(shlex.quote(w) for w in command), (), str(venv_path), node_cpus)  # type: ignore[arg-type]  # a CommandSpec: the plan reads its name and slurm section
    text = script(plan, spec, runs, cwd, venv_path)
    prepared = Prepared(resources_file or "", "", [plan], [v for v, _ in runs] if array else [], True,
                        spec.run_dir, text)
    return prepared, runs


def submit(prepared: Prepared, runs: list, cwd: Path) -> list[Job]:
    """Check with the controller, write the script into the run folder, submit it."""
    controller.require_controller()
    plan = prepared.plans[0]
    path = generated_path(plan.spec.name, cwd)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prepared.text)
    controller.test_only(path, plan.slurm)
    private_folder(prepared.run_dir)  # the logs (and the environment's values in the script's copy)
    job_id = controller.submit(path)
    run_dir = prepared.run_dir
    if len(runs) == 1:
        log = run_dir / f"slurm-{job_id}.out"
        return [Job(job_id, run_dir, [log], run_dir, log.name)]
    jobs = []
    for i, (variant, _) in enumerate(runs):
        log = run_dir / f"slurm-{job_id}_{i}.out"
        jobs.append(Job(f"{job_id}_{i}", run_dir / f"{i}-{_slug(variant)}", [log], run_dir, log.name, variant))
    return jobs
