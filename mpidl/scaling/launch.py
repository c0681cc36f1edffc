"""How a study starts the trainer on p ranks (on n nodes): a small interface, one implementation
per launcher.

    launcher = make_launcher(study, cores)
    launcher.check(ranks, nodes, argv)      # before anything runs: BadInput if it cannot start; how it starts
    launcher.run(ranks, argv, nodes=n, env=env, cwd=cwd, timeout=s, log=path) -> Finished

argv is the trainer's command line, `mpidl train JOB --set ...`. `mpirun` runs it here, now, on
one node. `slurm` makes each point one SLURM job through the submit API, in this process, and
follows it as `mpidl submit --wait` does (the same job and `--set` items, plus the placement:
slurm.nodes, slurm.tasks_per_node, srun --mpi=pmix); it keeps the job objects, and cancels a job
past the timeout or when the study is interrupted. Either
returns once the ranks (the job) have ended, with the exit status, and leaves the trainer's
files in the run folder named on the command line (`--set output=...`), where `log` lies too;
the runner reads nothing else.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional, Protocol, TextIO

from mpidl.errors import EXIT_BAD_INPUT, BadInput

if TYPE_CHECKING:
    from mpidl.scaling.study import Study
    from mpidl.slurm.submit import Prepared
    from mpidl.slurm.watch import Job


@dataclass(frozen=True)
class Finished:
    returncode: int
    seconds: float
    timed_out: bool
    output_tail: str


class Launcher(Protocol):
    name: str

    def oversubscribed(self, ranks: int, nodes: int = 1) -> bool:
        """More ranks than this machine (or a node) has cores: figures are marked."""

    def check(self, ranks: int, nodes: int, argv: list[str]) -> str:
        """What can be known before anything runs; BadInput (one line) when this placement cannot start.
        Returns how the point will start, in one line (`mpidl scale --dry-run` prints it)."""

    def run(self, ranks: int, argv: list[str], *, nodes: int = 1, env: dict, cwd: Path, timeout: float,
            log: Path) -> Finished:
        ...

    def describe(self) -> dict:
        ...


def _supervise(cmd: list[str], *, env: dict, cwd: Path, timeout: float, log: Path,
               on_timeout=None) -> Finished:
    """Run cmd with its output in `log`; past `timeout`, call on_timeout (the text so far), then end
    its session (TERM, KILL 30 s later)."""
    t0 = time.monotonic()
    timed_out = False
    with open(log, "w") as out:
        # A session of its own, so a run past its time is ended with everything it started.
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            if on_timeout is not None:
                on_timeout(log.read_text(errors="replace"))
            os.killpg(p.pid, signal.SIGTERM)
            try:
                rc = p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                rc = p.wait()
    text = log.read_text(errors="replace")
    return Finished(rc, time.monotonic() - t0, timed_out, text[-4000:])


class MpirunLauncher:
    """`mpirun -np P [--oversubscribe] [args] argv...` on this machine."""

    name = "mpirun"

    def __init__(self, args: list[str], cores: int):
        self.args = list(args)
        self.cores = cores

    def oversubscribed(self, ranks: int, nodes: int = 1) -> bool:
        return ranks > self.cores

    def command(self, ranks: int, argv: list[str]) -> list[str]:
        extra = ["--oversubscribe"] if self.oversubscribed(ranks) else []
        return ["mpirun", "-np", str(ranks), *extra, *self.args, *argv]

    def check(self, ranks: int, nodes: int, argv: list[str]) -> str:
        assert nodes == 1, "the study schema gives mpirun one node"
        return " ".join(self.command(ranks, argv))

    def run(self, ranks: int, argv: list[str], *, nodes: int = 1, env: dict, cwd: Path, timeout: float,
            log: Path) -> Finished:
        assert nodes == 1, "the study schema gives mpirun one node"
        return _supervise(self.command(ranks, argv), env=env, cwd=cwd, timeout=timeout, log=log)

    def describe(self) -> dict:
        try:
            version = subprocess.run(["mpirun", "--version"], capture_output=True, text=True,
                                     timeout=30).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            version = "unknown"
        return {"name": self.name, "version": version, "args": self.args, "cores": self.cores}


class SlurmLauncher:
    """One SLURM job per point, submitted and followed in this process through the submit API
    (`mpidl.slurm.submit`, or `mpidl.slurm.command` for a study's own command): the job
    `mpidl submit --wait JOB --set ...` would send, with the point's placement.

    The job is the trainer's job spec and `--set` items, plus what the study fixes for SLURM: the
    node count and ranks per node, srun --mpi=pmix, one CPU per thread of a rank (so 1 node × 2
    ranks and 2 nodes × 1 rank run the same threads), a time limit just past the study's per-run
    timeout, and no requeue (a run that restarts would measure its restart). The point's
    environment is the job's (sbatch exports the environment it is run in). A job still running
    past the timeout, or when the study is interrupted, is cancelled, and its ranks waited for.
    """

    name = "slurm"

    def __init__(self, partition: Optional[str], threads_per_rank: int, timeout_s: float, cores: int,
                 gpus: bool = False):
        self.partition = partition
        self.gpus = gpus  # the job asks for GPUs: each point asks one a rank
        self.threads_per_rank = threads_per_rank
        self.minutes = math.ceil(timeout_s / 60) + 2  # the launcher's own timeout (and scancel) comes first
        self.cores = cores
        self._node_cpus: Optional[int] = None

    def placement(self, ranks: int, nodes: int) -> list[str]:
        """The `--set` items that place `ranks` ranks on `nodes` nodes."""
        sets = [f"slurm.nodes={nodes}", f"slurm.tasks_per_node={ranks // nodes}", "slurm.launcher=srun",
                f"slurm.time={self.minutes}", "slurm.requeue_limit=0"]
        if self.gpus:
            sets.append(f"slurm.gpus_per_node={ranks // nodes}")
        if self.threads_per_rank:
            sets.append(f"slurm.cpus_per_task={self.threads_per_rank}")
        if self.partition is not None:
            sets.append(f"slurm.partition={json.dumps(self.partition)}")
        return sets

    def submission(self, ranks: int, nodes: int, argv: list[str]) -> tuple[str, list[str]]:
        """(the job file, the --set items) of the point's job, from `mpidl train JOB --set ...`."""
        i = argv.index("train")
        job, rest = argv[i + 1], argv[i + 2:]
        if len(rest) % 2 or any(flag != "--set" for flag in rest[::2]):
            raise ValueError(f"expected `mpidl train JOB --set ...`, got {argv}")
        return job, [*rest[1::2], *self.placement(ranks, nodes)]

    def prepare(self, ranks: int, nodes: int, argv: list[str], *, cwd: Path, output: Optional[Path] = None,
                overwrite: bool = False) -> tuple["Prepared", Optional[list]]:
        """The point's job, validated and its script written out (nothing submitted): (prepared, the
        command's elements) for a study's own command (`mpidl submit -- CMD`, its logs in
        `output`), (prepared, None) for the trainer's job."""
        from mpidl.slurm import command, submit

        if "train" not in argv[:3]:
            sets = self.placement(ranks, nodes) + ([f"output={json.dumps(str(output))}"] if output else [])
            return command.prepare(None, {}, sets, argv, array=[], cwd=cwd, venv=None)
        job, sets = self.submission(ranks, nodes, argv)
        return submit.prepare(job, sets, array=[], standalone_script=False, cwd=cwd, overwrite=overwrite), None

    def node_cpus(self) -> int:
        if self._node_cpus is None:
            from mpidl.slurm import controller

            self._node_cpus = controller.node_cpus(self.partition) or self.cores
        return self._node_cpus

    def oversubscribed(self, ranks: int, nodes: int = 1) -> bool:
        return ranks // nodes > self.node_cpus()

    def check(self, ranks: int, nodes: int, argv: list[str]) -> str:
        """The point's job as it will be sent, judged by `sbatch --test-only`; returns its #SBATCH lines."""
        from mpidl.slurm import controller

        prepared, _ = self.prepare(ranks, nodes, argv, cwd=Path.cwd(), overwrite=True)
        with tempfile.NamedTemporaryFile("w", prefix="mpidl-scale-", suffix=".sh") as f:
            f.write(prepared.text)
            f.flush()
            controller.test_only(Path(f.name), prepared.plans[0].slurm)
        return " ".join(line.split(None, 1)[1] for line in prepared.text.splitlines() if line.startswith("#SBATCH "))

    def run(self, ranks: int, argv: list[str], *, nodes: int = 1, env: dict, cwd: Path, timeout: float,
            log: Path) -> Finished:
        """Submit the point's job, follow it into `log` (as `mpidl submit --wait` prints it), and
        return its exit status: 0, 2 for bad input (the job's, or the submission's), 1 otherwise."""
        from mpidl.slurm import command, submit, watch

        t0 = time.monotonic()
        jobs: list[Job] = []
        ended = None
        timed_out = False
        with open(log, "w") as out:
            try:
                with _environment(env):  # sbatch gives the job the environment it runs in
                    prepared, runs = self.prepare(ranks, nodes, argv, cwd=cwd, output=log.parent)
                    jobs = command.submit(prepared, runs, cwd) if runs is not None else submit.submit(prepared, cwd)
                submit.describe(jobs, prepared, out)
                try:
                    ended, = watch.wait(jobs, out=out, deadline=t0 + timeout)
                except TimeoutError:
                    timed_out = True
                    _cancel(jobs, out)
                    ended, = watch.wait(jobs, out=out, deadline=time.monotonic() + 120)
                watch.report(jobs[0], ended, out, out)
                returncode = ended.exit_code
            except BadInput as e:  # what `mpidl submit` refuses: one line, exit 2
                out.write(f"error: {e}\n")
                returncode = EXIT_BAD_INPUT
            except Exception:  # a point that cannot be submitted or followed fails alone, its traceback in its log
                out.write(traceback.format_exc())
                returncode = 1
            finally:  # interrupted, or lost track of: the job must not outlive the study's account of it
                if jobs and ended is None:
                    _cancel(jobs, out)
        # submitit's folder: the job's script and pickles, every rank's log. Rank 0's log is in
        # `log` already; the rest is kept where the job failed, to find out why.
        folder = log.parent / "slurm"
        if returncode == 0 and not timed_out:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            for pickle in folder.glob("*.pkl"):
                pickle.unlink()
        # Paths below the working directory as relative ones, as mpidl's scripts name them: a
        # committed study's logs then say nothing about the machine it ran on.
        text = log.read_text(errors="replace").replace(f"{Path(cwd).absolute()}/", "")
        log.write_text(text)
        return Finished(returncode, time.monotonic() - t0, timed_out, text[-4000:])

    def describe(self) -> dict:
        def ask(cmd: list[str]) -> str:
            try:
                return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
            except (OSError, subprocess.SubprocessError):
                return ""

        where = ["-p", self.partition] if self.partition else []
        partitions = ask(["sinfo", "-h", "-o", "%P", *where]).split()
        default = next((p for p in partitions if p.endswith("*")), partitions[0] if partitions else "")
        return {"name": self.name, "version": ask(["sinfo", "--version"]) or "unknown",
                "partition": self.partition or default.rstrip("*") or "unknown",
                "nodes": list(dict.fromkeys(ask(["sinfo", "-h", "-N", "-o", "%N", *where]).split())),
                "cpus_per_node": self.node_cpus(),
                "launch": "mpidl submit --wait, one job per point; srun --mpi=pmix", "args": []}


@contextmanager
def _environment(env: dict) -> Iterator[None]:
    """os.environ is `env` inside (sbatch, run by the submit API, exports it to the job)."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _cancel(jobs: list["Job"], out: TextIO, tries: int = 3) -> None:
    """Cancel the jobs still running and wait until their ranks are gone (on SIGTERM they still
    write a checkpoint and a summary). A controller too busy to answer is asked `tries` times;
    the log says the job was cancelled only when scancel said so."""
    for job in jobs:
        for attempt in range(1, tries + 1):
            asked = subprocess.run(["scancel", job.job_id], capture_output=True, text=True, timeout=60)
            if asked.returncode == 0:
                break
            queued = _queued(job)
            if not queued or attempt == tries:
                break
            time.sleep(2 * attempt)
        if asked.returncode:
            why = (asked.stderr or asked.stdout).strip().splitlines() or [f"exit {asked.returncode}"]
            said = f"scancel failed {tries} times: {why[-1]}" if queued else "ended before scancel reached it"
            out.write(f"[mpidl] job {job.job_id}: {said}\n")
            out.flush()
            continue
        out.write(f"[mpidl] job {job.job_id}: cancelled by the study\n")
        out.flush()
        for _ in range(120):
            if not _queued(job):
                break
            time.sleep(0.5)


def _queued(job: "Job") -> bool:
    """Whether SLURM still lists the job: pending, running, or its processes still ending. A job
    the controller has forgotten is gone; a controller that does not answer may still have it."""
    left = subprocess.run(["squeue", "-h", "-j", job.job_id, "-o", "%t"], capture_output=True, text=True,
                          timeout=60)
    if left.returncode:
        return "Invalid job id" not in left.stderr + left.stdout
    return bool(left.stdout.strip())


def mpidl_command() -> list[str]:
    """`<venv>/bin/mpidl`, the console script beside this interpreter, or `python -m mpidl.cli`."""
    script = Path(sys.executable).parent / "mpidl"
    return [str(script)] if script.exists() else [sys.executable, "-m", "mpidl.cli"]


def unreachable(name: str) -> Optional[str]:
    """Why the launcher cannot start anything here, or None."""
    if name == "mpirun":
        return None if shutil.which("mpirun") else "not found on PATH"
    for command in ("sbatch", "scontrol", "sinfo", "squeue", "scancel"):
        if shutil.which(command) is None:
            return f"{command} not found on PATH (each point is a SLURM job: the SLURM client commands are needed)"
    from mpidl.slurm import controller

    try:
        controller.require_controller()
    except BadInput as e:
        return str(e)
    return None


def make_launcher(study: "Study", cores: int) -> Launcher:
    s = study.spec
    if s.launcher.name == "mpirun":
        return MpirunLauncher(s.launcher.args, cores)
    if s.launcher.name == "slurm":
        partition = s.launcher.partition or (study.job.slurm.partition if study.job else None)
        gpus = bool(study.job and study.job.slurm.gpus_per_node)
        return SlurmLauncher(partition, s.threads_per_rank, s.timeout_s, cores, gpus=gpus)
    raise ValueError(f"unknown launcher {s.launcher.name!r}")  # the study schema admits only the names above
