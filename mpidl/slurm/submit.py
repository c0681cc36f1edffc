"""`mpidl submit`: a job spec -> an sbatch script -> a SLURM job (or array), checked first.

Everything that can be known before submitting is checked before: the spec and each array
variant (one line naming file, key and value), the values an #SBATCH line must carry, the
client commands, the controller, and the controller's own verdict on the script
(`sbatch --test-only`: an unknown partition, more GPUs or tasks than a node has).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import stat
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, TextIO

import yaml

from mpidl import runlock
from mpidl.errors import BadInput
from mpidl.slurm import controller, executor
from mpidl.slurm.script import Plan, sbatch_safe, shown_path, standalone
from mpidl.slurm.task import TrainTask
from mpidl.slurm.watch import Job
from mpidl.spec import JobSpec, check_run_folders, load_spec, quoted, read_spec_text

GENERATED = Path("slurm") / "generated"


def array_variants(items: list[str], origin: str) -> list[list[str]]:
    """`--array` values -> lists of `--set` overrides, one list per array element.

    `KEY=V1,V2,...` gives one element per value; several such items give every combination;
    `@FILE` (or an existing file) gives one element per line (`KEY=VALUE ...`, shell-quoted;
    blank lines and `#` comments skipped).
    """
    variants: list[list[str]] = [[]]
    for item in items:
        path = Path(item[1:]) if item.startswith("@") else Path(item)
        if item.startswith("@") or ("=" not in item and path.is_file()):
            try:
                lines = path.read_text().splitlines()
            except OSError as e:
                raise BadInput(f"--array {item}: cannot read ({e.strerror})") from None
            rows = []
            for n, line in enumerate(lines, 1):
                if line.strip() and not line.lstrip().startswith("#"):
                    try:
                        row = shlex.split(line)
                    except ValueError as e:
                        raise BadInput(f"{path}: line {n}: {e}") from None
                    bad = [w for w in row if "=" not in w]
                    if bad:
                        raise BadInput(f"{path}: line {n}: expected KEY=VALUE, got {bad[0]!r}")
                    rows.append(row)
            if not rows:
                raise BadInput(f"{path}: no variants (one line of KEY=VALUE ... per array element)")
            variants = [v + r for v in variants for r in rows]
        else:
            key, eq, values = item.partition("=")
            if not eq or not key or not values:
                raise BadInput(f"{origin}: --array expects KEY=V1,V2,... or @FILE, got {item!r}")
            variants = [v + [f"{key}={x}"] for v in variants for x in values.split(",")]
    return variants


def _slug(variant: list[str]) -> str:
    text = "_".join(variant) or "base"
    return re.sub(r"[^A-Za-z0-9._=,+-]", "-", text)[:60]


@dataclass
class Prepared:
    """The validated specs and the script of one submission."""

    job_file: str
    spec_text: str
    plans: list[Plan]
    variants: list[list[str]]
    standalone: bool
    run_dir: Path          # the submission's folder (an array's elements live below it)
    text: str              # the exact sbatch script
    resume: bool = False
    overwrite: bool = False

    @property
    def folder(self) -> Path:
        """submitit's folder: scripts, pickles and every rank's logs."""
        return self.run_dir / "slurm"

    def executor(self) -> executor.MpidlSlurmExecutor:
        return executor.make(self.plans[0], self.folder)


def prepare(job_file: str, sets: list[str], *, array: list[str], standalone_script: bool,
            cwd: Path, resume: bool = False, overwrite: bool = False, venv: Optional[str] = None,
            ask_controller: bool = True) -> Prepared:
    """Validate everything, then build the script text (nothing is written or submitted).

    ask_controller: ask SLURM for the node's CPUs when the spec does not say (to split them).
    """
    spec_text = read_spec_text(job_file)
    base = load_spec(job_file, sets, text=spec_text)
    variants = array_variants(array, job_file) if array else [[]]
    if standalone_script and array:
        raise BadInput("--standalone and --array: an array goes through submitit (leave out --standalone)")
    run_dir = base.run_dir
    if not standalone_script:  # submitit's #SBATCH --output names the run folder
        where = str(run_dir.absolute())
        sbatch_safe("output (the run folder, where the logs go)", where)
        if "%" in where:  # the spec refuses % in output; this is the folder it is relative to
            raise BadInput(f"output (the run folder, where the logs go) = {json.dumps(where)}: % is refused: SLURM "
                           "expands it in the log paths under the run folder (#SBATCH --output)")
    specs: list[tuple[JobSpec, list[str]]] = []
    for i, variant in enumerate(variants):
        own = list(sets) + variant
        if array:
            element_dir = run_dir / f"{i}-{_slug(variant)}"
            # braces doubled: `output` is formatted with the name
            own.append("output=" + quoted(str(element_dir).replace("{", "{{").replace("}", "}}")))
            if base.checkpoint.dir:
                own.append("checkpoint.dir=" + quoted(str(element_dir / "checkpoints")))
        try:
            spec = load_spec(job_file, own, text=spec_text)
            runlock.check_free(spec.run_dir)
            check_run_folders(spec)  # submitit makes its folder of logs in the run folder
            if not resume and not overwrite:
                _fresh(spec)
        except BadInput as e:
            raise BadInput(f"--array element {i} ({' '.join(variant)}): {e}" if array else str(e)) from None
        specs.append((spec, own))
    if array and len({(s.slurm.model_dump_json()) for s, _ in specs}) > 1:
        raise BadInput("--array: the variants ask for different slurm resources; one array shares one script")
    spec = specs[0][0]
    node_cpus = None
    if ask_controller and spec.slurm.cpus_for_each_task() is None and controller.controller_answers():
        node_cpus = controller.node_cpus(spec.slurm.partition)
    venv_path = Path(spec.slurm.venv or venv or sys.prefix)
    # A standalone script names files relative to the submit directory; submitit's names the
    # interpreter by absolute path, as it names its folder.
    venv_shown = shown_path(venv_path, cwd) if standalone_script else str(venv_path.absolute())
    flags = tuple(f for f, on in (("--resume", resume), ("--overwrite", overwrite)) if on)
    plans = [Plan(s, shown_path(job_file, cwd), tuple(own if array else sets), venv_shown, node_cpus, flags)
             for s, own in specs]
    if standalone_script:
        text = standalone(plans[0])
    else:
        text = executor.script_text(executor.make(plans[0], run_dir / "slurm"), array=len(plans) if array else 0)
    return Prepared(job_file, spec_text, plans, variants if array else [], standalone_script, run_dir, text,
                    resume, overwrite)


def _fresh(spec: JobSpec) -> None:
    """A fresh job must not land in a run folder holding another run's checkpoints (the trainer
    refuses too, but only once the job runs)."""
    from mpidl.train import checkpoint

    found = checkpoint.all_checkpoints(spec.checkpoint_dir)
    if found:
        raise BadInput(f"{spec.checkpoint_dir}: already holds a run's checkpoints ({found[-1].name}): add --resume "
                       "to continue it, --overwrite to replace it, or set another output or name")


def private_folder(folder: Path) -> None:
    """submitit's folder: every rank unpickles and runs what lies there, so only its owner may
    write it (or read it: the pickles hold the spec). Refused when someone else made it."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = os.lstat(folder)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise BadInput(f"{folder}: not a folder (a symbolic link?): submitit's pickles must lie in a private folder")
    if st.st_uid != os.getuid():
        raise BadInput(f"{folder}: owned by uid {st.st_uid}, not you: the job would run the pickles found there; "
                       "set another output")
    os.chmod(folder, 0o700)


def generated_path(spec_name: str, cwd: Path) -> Path:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", spec_name) or "job"
    return cwd / GENERATED / f"{name}.sbatch"


def dry_run(prepared: Prepared, cwd: Path) -> int:
    """Write the script, print its path, and let the controller judge it where one answers."""
    path = generated_path(prepared.plans[0].spec.name, cwd)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prepared.text.rstrip("\n") + "\n")
    print(shown_path(path, cwd))
    if controller.controller_answers():
        controller.require("sbatch")
        print(f"sbatch --test-only: {controller.test_only(path, prepared.plans[0].slurm)}")
    else:
        print("sbatch --test-only: skipped (no SLURM controller answers here)")
    return 0


def submit(prepared: Prepared, cwd: Path) -> list[Job]:
    """Check with the controller, then submit; returns the jobs (one per array element)."""
    controller.require_controller()
    if prepared.standalone:
        path = generated_path(prepared.plans[0].spec.name, cwd)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(prepared.text)
        controller.test_only(path, prepared.plans[0].slurm)
        job_id = controller.submit(path)
        log = cwd / f"slurm-{job_id}.out"
        return [Job(job_id, prepared.run_dir, [log], cwd, log.name)]

    # nothing in the run folder yet
    with tempfile.NamedTemporaryFile("w", prefix="mpidl-test-only-", suffix=".sh") as f:
        f.write(prepared.text)
        f.flush()
        controller.test_only(Path(f.name), prepared.plans[0].slurm)
    private_folder(prepared.folder)
    ex = prepared.executor()
    # Each task carries its validated spec, overrides applied, with slurm.env redacted: the pickle
    # need not hold tokens (the script exports them to the ranks).
    tasks = [TrainTask(str(Path(prepared.job_file).absolute()), yaml.safe_dump(p.spec.redacted_dump(), sort_keys=False),
                       [], prepared.resume, prepared.overwrite) for p in prepared.plans]
    if len(tasks) == 1 and not prepared.variants:
        submitted = [ex.submit(tasks[0])]
    else:
        submitted = ex.submit_array(tasks)
    jobs = []
    for sj, plan, variant in zip(submitted, prepared.plans, prepared.variants or [[]]):
        paths = sj.paths
        jobs.append(Job(sj.job_id, plan.spec.run_dir, [paths.stdout, paths.stderr], paths.folder,
                        f"{sj.job_id}_*_log.*", variant))
    return jobs


def describe(jobs: list[Job], prepared: Prepared, out: Optional[TextIO] = None) -> None:
    """What was submitted: job ids, run folders, log paths (to `out`, standard output by default)."""
    stream = out or sys.stdout
    if prepared.variants:
        print(f"submitted array {jobs[0].job_id.split('_')[0]} ({len(jobs)} elements) under {prepared.run_dir}",
              file=stream)
        for job in jobs:
            print(f"  {job.job_id}  {' '.join(job.variant)}  run {job.run_dir}  log {job.rank0_logs[0]}", file=stream)
        return
    job = jobs[0]
    print(f"submitted job {job.job_id}", file=stream)
    print(f"  run folder  {job.run_dir}", file=stream)
    print(f"  rank 0 log  {'  '.join(str(p) for p in job.rank0_logs)}", file=stream)
    if not prepared.standalone:
        print(f"  every rank  {job.log_dir / job.log_pattern}", file=stream)
    stream.flush()
