"""`mpidl check JOB.yaml [-n N] [--steps S]`: the job, for S steps on N local CPU ranks, on a
small slice of its data, checked line by line before it goes to the cluster.

Every run is the real thing: `mpidl train` (with the probe of probe.py added) under `mpirun`,
in a temporary folder, the spec changed only by `--set` (the data, the output, the length,
a metrics record every step). Three runs:

  A  the job, S steps, uninterrupted;
  B  the same job; the last rank sends itself SIGUSR2 during step k + 1 (k = the steps of one
     epoch): every rank must stop after step k + 2 with a checkpoint and exit 3;
  C  B resumed (`--resume`): each of its steps must leave the weights of A's same step.

and the lines, in order:

  spec        the spec validates (as `mpidl train` and `mpidl submit` load it)
  data        the slice of the data (or a stand-in) and where its rows or shapes came from;
              the trainer's own label and target checks, on all of the data
  loss        run A trains every step with a finite loss
  shares      each rank reads as many rows as the others each epoch, and no row another reads
  weights     after every step the ranks' parameters are identical (a hash of each, gathered)
  preemption  run B: the signal mid-step, a checkpoint, exit 3
  resume      run C continues bit for bit (B's steps before the stop equal A's too)
  slurm       the sbatch script of the spec's slurm: section passes `sbatch --test-only`
              where a controller answers
  estimate    step time (median after the first step) and peak memory (max RSS) per rank

`--only LINE,...` runs what those lines need and no more: the data for a run's lines, run A for
loss, shares, weights and estimate, B for preemption too, C for resume too. Every line a run
made is shown (A's four come together); a line not asked and not made says "not asked (--only)".

Exit status 0 when no line failed (skipped lines do not fail), 1 when one did, 2 when the spec
does not validate.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from mpidl.check import DIR_ENV, SIGNAL_ENV, data
from mpidl.errors import EXIT_BAD_INPUT, BadInput

OK, FAIL, SKIPPED = "ok", "FAIL", "skipped"
LINES = ("spec", "data", "loss", "shares", "weights", "preemption", "resume", "slurm", "estimate")
RUN_ENV = ("MPIDL_BACKEND", "MPIDL_OUTPUT", "MPIDL_STEPS", "MPIDL_LOG_EVERY", "MPIDL_REQUEUE", "MPIDL_REQUEUE_LIMIT")
WIDTH = 11  # the check names' column


@dataclass
class Line:
    name: str
    status: str
    detail: str

    def __str__(self) -> str:
        return f"  {self.name:<{WIDTH}} {self.status:<8} {self.detail}"


@dataclass
class Run:
    """One launch: its exit, output and what each rank's probe wrote."""

    name: str
    folder: Path                      # the run folder (output)
    returncode: int
    seconds: float
    timed_out: bool
    output: str
    ranks: dict[int, list[dict]] = field(default_factory=dict)

    def events(self, kind: str) -> dict[int, list[dict]]:
        return {r: [x for x in recs if x["event"] == kind] for r, recs in self.ranks.items()}

    def steps(self) -> dict[int, dict[int, dict[str, str]]]:
        """step -> rank -> parameter hashes."""
        out: dict[int, dict[int, dict[str, str]]] = {}
        for r, recs in self.events("step").items():
            for x in recs:
                out.setdefault(x["step"], {})[r] = x["params"]
        return out

    def summary(self) -> Optional[dict]:
        try:
            return json.loads((self.folder / "summary.json").read_text())
        except (OSError, ValueError):
            return None

    def metrics(self) -> list[dict]:
        try:
            text = (self.folder / "metrics.jsonl").read_text()
        except OSError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def failure(self) -> str:
        """The line that says why the run failed."""
        if self.timed_out:
            return f"no end after {self.seconds:.0f} s (a hang?)"
        return reason(self.output, self.returncode)


def reason(text: str, returncode: int) -> str:
    """The one line of a failed run's output that says why: an mpidl error line, else the last
    exception line of a traceback, else the exit status and the last line."""
    lines = [ln.rstrip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.search(r"(^|\] )error: ", ln)]
    if errors:
        return errors[0].strip()
    raised = [ln for ln in lines if re.match(r"^(\[rank \d+\] )?[\w.]*(Error|Exception|Interrupt)\b", ln)]
    if raised:
        return raised[-1].strip()
    lines = [ln for ln in lines if not set(ln.strip()) <= set("-=")]  # Open MPI frames its messages
    said = [ln for ln in lines if ln.startswith("mpirun ")]  # "mpirun has detected…", "mpirun noticed that…"
    return f"exit status {returncode}" + (f": {(said or lines[-1:])[0].strip()}" if lines else "")


def ranks_of(n: int, kind: str = "") -> str:
    return f"{n} {kind}rank" + ("s" if n != 1 else "")


def quoted_path(path: Path) -> str:
    """A path as a --set value for `output` (YAML-quoted; braces doubled: it is a template)."""
    return json.dumps(str(path).replace("{", "{{").replace("}", "}}"))


class Checker:
    def __init__(self, job: str, sets: list[str], ranks: int, steps: int, folder: Path, timeout: float,
                 show: Callable[[str], None] = print, only: Optional[list[str]] = None):
        self.job, self.sets, self.ranks, self.steps = job, list(sets), ranks, steps
        self.folder, self.timeout, self.show = folder, timeout, show
        self.lines: list[Line] = []
        # What --only asks for, with what it needs: each launch costs seconds (Python, torch, MPI).
        asked = {"spec", *(LINES if only is None else only)}
        self.runs_wanted = ("abc" if "resume" in asked else "ab" if "preemption" in asked
                            else "a" if asked & {"loss", "shares", "weights", "estimate"} else "")
        if self.runs_wanted:  # a run needs the data; run A gives its four lines at no extra cost
            asked |= {"data", "loss", "shares", "weights", "estimate"}
        self.asked = asked
        # A few epochs in S steps: a preemption lands mid-epoch and a resume crosses an epoch's end.
        self.per_epoch = max(2, math.ceil(steps / 3))
        self.signal_at = self.per_epoch           # 0-based: SIGUSR2 during step per_epoch + 1
        # Ranks learn of a signal one step later (no extra synchronisation); one rank at once.
        self.stop = self.signal_at + (2 if ranks > 1 else 1)
        self.first: Optional[Run] = None           # run A, for the estimate
        self.seconds: dict[str, float] = {}        # each run's, for check.json

    def not_asked(self, *names: str) -> None:
        for name in names:
            self.line(name, SKIPPED, "not asked (--only)")

    def line(self, name: str, status: str, detail: str) -> Line:
        ln = Line(name, status, detail)
        self.lines.append(ln)
        self.show(str(ln))
        return ln

    # ------------------------------------------------------------------ runs
    def command(self, sets: list[str], run_dir: Path, resume: bool) -> tuple[list[str], dict[str, str]]:
        """A run's argv and the variables it adds: `mpidl train` with the probe, pointed at run_dir."""
        argv = [sys.executable, "-m", "mpidl.check.probe", self.job]
        for item in [*sets, f"output={quoted_path(run_dir)}"]:
            argv += ["--set", item]
        return argv + (["--resume"] if resume else []), {}

    def launch(self, name: str, sets: list[str], *, signal_at: Optional[int] = None, resume: bool = False,
               output: Optional[Path] = None) -> Run:
        from mpidl.scaling.launch import MpirunLauncher

        run_dir = output or self.folder / name
        probe = self.folder / f"probe-{name}"
        shutil.rmtree(probe, ignore_errors=True)
        argv, extra = self.command(sets, run_dir, resume)
        # The check's own runs: no requeue, and none of a study's or a check's settings from outside.
        env = {k: v for k, v in os.environ.items() if k not in (DIR_ENV, SIGNAL_ENV, *RUN_ENV)}
        env.update({**extra, DIR_ENV: str(probe), "CUDA_VISIBLE_DEVICES": ""})  # local CPU ranks
        # `python` in a command is this venv's, as in the scripts `mpidl submit -- CMD` writes.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        if signal_at is not None:
            env[SIGNAL_ENV] = str(signal_at)
        if shutil.which("mpirun") is None:
            raise BadInput("mpirun: not found on PATH (mpidl check starts the job's ranks with it)")
        done = MpirunLauncher([], os.cpu_count() or 1).run(self.ranks, argv, env=env, cwd=Path.cwd(),
                                                           timeout=self.timeout, log=self.folder / f"{name}.log")
        self.seconds[name] = done.seconds
        ranks = {}
        for r in range(self.ranks):
            path = probe / f"rank-{r}.jsonl"
            ranks[r] = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
        return Run(name, run_dir, done.returncode, done.seconds, done.timed_out,
                   (self.folder / f"{name}.log").read_text(errors="replace"), ranks)

    # ------------------------------------------------------------------ the checks
    def run(self, synthetic: bool = False, shapes: Optional[list[str]] = None, classes: Optional[int] = None) -> int:
        from mpidl.spec import load_spec

        t0 = time.monotonic()
        self.show(f"mpidl check {self.job}: {ranks_of(self.ranks, 'CPU ')}, {self.steps} steps "
                  f"({self.per_epoch} an epoch)")
        try:
            spec = load_spec(self.job, self.sets)
        except BadInput as e:
            self.line("spec", FAIL, str(e))
            return EXIT_BAD_INPUT
        self.line("spec", OK, f"{self.job} validates: model {spec.model.name}, backend {spec.backend}, "
                              f"batch {spec.data.batch} a rank")
        sliced = None
        if "data" not in self.asked:
            self.not_asked("data")
        else:
            try:
                sliced = data.prepare(spec, self.folder / "data", self.ranks, self.per_epoch, synthetic=synthetic,
                                      shapes=shapes, classes=classes)
                self.line("data", OK, sliced.note)
            except BadInput as e:
                self.line("data", FAIL, str(e))
        if not self.runs_wanted:
            self.not_asked("loss", "shares", "weights", "preemption", "resume")
        elif sliced is not None:
            self.runs([*self.sets, *sliced.sets, f"steps={self.steps}", "log_every=1", "checkpoint.dir=null"])
        else:
            for name in ("loss", "shares", "weights", "preemption", "resume"):
                self.line(name, SKIPPED, "no data to run on")
        self.slurm()
        self.estimate()
        return self.verdict(t0)

    def verdict(self, t0: float) -> int:
        """The last line, and check.json in the folder (the lines, each run's seconds) for scripts."""
        counts = {s: sum(ln.status == s for ln in self.lines) for s in (OK, FAIL, SKIPPED)}
        seconds = time.monotonic() - t0
        self.show(f"{counts[OK]} passed, {counts[FAIL]} failed, {counts[SKIPPED]} skipped in {seconds:.1f} s")
        code = 1 if counts[FAIL] else 0
        (self.folder / "check.json").write_text(json.dumps({
            "exit": code, "seconds": seconds, "runs": self.seconds,
            "lines": [{"name": ln.name, "status": ln.status, "detail": ln.detail} for ln in self.lines]}, indent=2))
        return code

    def runs(self, sets: list[str]) -> None:
        try:
            a = self.launch("a", sets)
        except BadInput as e:  # no mpirun here
            self.line("loss", FAIL, str(e))
            for name in ("shares", "weights", "preemption", "resume"):
                self.line(name, SKIPPED, "no run")
            return
        ok = a.returncode == 0 and not a.timed_out
        self.loss(a, ok)
        self.shares(a)
        self.weights(a)
        self.first = a
        if "b" not in self.runs_wanted:
            self.not_asked("preemption", "resume")
        elif not ok:
            for name in ("preemption", "resume"):
                self.line(name, SKIPPED, "the uninterrupted run failed (see loss)")
        else:
            b = self.launch("b", sets, signal_at=self.signal_at)
            if not self.preemption(b):
                self.line("resume", SKIPPED, "no checkpoint from a preemption to resume")
            elif "c" not in self.runs_wanted:
                self.not_asked("resume")
            else:
                c = self.launch("c", sets, resume=True, output=b.folder)
                self.resume(a, b, c)

    def loss(self, a: Run, ok: bool) -> None:
        if not ok:
            self.line("loss", FAIL, f"the run failed (exit {a.returncode}): {a.failure()}")
            return
        losses = [m["loss"] for m in a.metrics() if "loss" in m and "val_loss" not in m]
        bad = [i for i, v in enumerate(losses, 1) if not math.isfinite(v)]
        if not losses:
            self.line("loss", SKIPPED, f"the run ended well, but {a.folder / 'metrics.jsonl'} holds no loss: log it "
                                       "(run.log(loss=loss))")
        elif bad:
            self.line("loss", FAIL, f"non-finite loss {losses[bad[0] - 1]} at step {bad[0]}")
        else:
            self.line("loss", OK, f"finite at each of {len(losses)} steps on {ranks_of(self.ranks)} "
                                  f"({losses[0]:.4g} -> {losses[-1]:.4g}), {a.seconds:.1f} s")

    def shares(self, a: Run) -> None:
        shares = {r: {x["epoch"]: x["rows"] for x in recs} for r, recs in a.events("share").items()}
        if any(not s for s in shares.values()):
            self.line("shares", SKIPPED, "the ranks did not reach their first step")
            return
        epochs = sorted(shares[0])
        for e in epochs:
            sizes = {r: len(shares[r].get(e, [])) for r in shares}
            if len(set(sizes.values())) > 1:
                counts = ", ".join(f"{n} (rank {r})" for r, n in sizes.items())
                self.line("shares", FAIL, f"epoch {e}: ranks read {counts} rows: a collective per step would wait "
                                          "for the rank that runs out")
                return
            seen: dict[int, int] = {}
            for r in sorted(shares):
                for row in shares[r][e]:
                    if row in seen:
                        both = len(set(shares[r][e]) & set(shares[seen[row]][e]))
                        self.line("shares", FAIL, f"epoch {e}: ranks {seen[row]} and {r} both read row {row} "
                                                  f"({both} rows in common)")
                        return
                    seen[row] = r
        per = len(shares[0][epochs[0]])
        self.line("shares", OK, f"{per} rows a rank in epoch {epochs[0]}, equal and disjoint in "
                                + (f"each of {len(epochs)} epochs" if len(epochs) > 1 else "the run's one epoch"))

    def weights(self, a: Run) -> None:
        steps = a.steps()
        if not steps:
            self.line("weights", SKIPPED, "no step finished")
            return
        for step in sorted(steps):
            per_rank = steps[step]
            ref = per_rank.get(0)
            for r in sorted(per_rank):
                if r == 0 or ref is None:
                    continue
                differ = [k for k in ref if per_rank[r].get(k) != ref[k]]
                if differ:
                    self.line("weights", FAIL, f"after step {step}, rank {r}'s {differ[0]} differs from rank 0's "
                                               f"({len(differ)} of {len(ref)} parameters differ): gradients not "
                                               "averaged, or a parameter changed outside the optimizer")
                    return
        last = max(steps)
        checksum = _digest(steps[last][0])
        if self.ranks == 1:
            self.line("weights", OK, f"one rank, nothing to compare (checksum {checksum} after step {last})")
            return
        self.line("weights", OK, f"identical on {self.ranks} ranks after each of {len(steps)} steps "
                                 f"(checksum {checksum} after step {last})")

    def preemption(self, b: Run) -> bool:
        s = b.summary()
        who = f"SIGUSR2 during step {self.signal_at + 1} on rank {self.ranks - 1}"
        if b.timed_out or b.returncode != 3:
            what = b.failure() if b.returncode not in (0, 3) or b.timed_out else f"exit {b.returncode}, not 3"
            self.line("preemption", FAIL, f"{who}: {what}")
            return False
        if s is None or s.get("preempted") != "SIGUSR2" or s.get("global_step") != self.stop:
            got = f"stopped after step {s.get('global_step')} ({s.get('preempted')})" if s else "no summary.json"
            self.line("preemption", FAIL, f"{who}: {got}, expected after step {self.stop} (SIGUSR2)")
            return False
        saved = sorted(b.folder.glob("checkpoints/ckpt-*.pt"))
        newest = int(re.sub(r"\D", "", saved[-1].name)) if saved else None
        if newest != self.stop:
            self.line("preemption", FAIL, f"{who}: the newest checkpoint in {b.folder / 'checkpoints'} is "
                                          f"{saved[-1].name if saved else 'none'}, not step {self.stop}'s")
            return False
        self.line("preemption", OK, f"{who}: every rank stopped after step {self.stop} with a checkpoint, exit 3")
        return True

    def resume(self, a: Run, b: Run, c: Run) -> None:
        if c.timed_out or c.returncode != 0:
            self.line("resume", FAIL, f"resuming at step {self.stop} failed: {c.failure()}")
            return
        first, resumed = a.steps(), {**b.steps(), **c.steps()}
        for step in sorted(first):
            if step not in resumed or 0 not in resumed[step]:
                self.line("resume", FAIL, f"no step {step} in the preempted and resumed runs")
                return
            ref, got = first[step][0], resumed[step][0]
            differ = [k for k in ref if got.get(k) != ref[k]]
            if differ:
                where = (f"after resuming at step {self.stop}, step {step}'s" if step > self.stop
                         else f"before the preemption, step {step}'s")
                why = ("state a checkpoint does not hold (an RNG, a counter, a buffer outside state_dict)"
                       if step > self.stop else "the job is not deterministic: a resume cannot continue bit for bit")
                self.line("resume", FAIL, f"{where} {differ[0]} differs from the uninterrupted run's "
                                          f"({len(differ)} of {len(ref)} parameters): {why}")
                return
        self.line("resume", OK, f"resumed at step {self.stop}: steps {self.stop + 1}-{max(first)} equal the "
                                "uninterrupted run's bit for bit")

    def prepared(self):
        """The submission `mpidl submit` would make of the job (checked, nothing written)."""
        from mpidl.slurm import submit

        return submit.prepare(self.job, self.sets, array=[], standalone_script=False, cwd=Path.cwd(), overwrite=True)

    def slurm(self) -> None:
        from mpidl.slurm import controller

        if "slurm" not in self.asked:
            self.not_asked("slurm")
            return
        try:
            prepared = self.prepared()
            if not controller.controller_answers():
                self.line("slurm", SKIPPED, "no controller: the script was written and its values checked, "
                                            "sbatch --test-only not asked")
                return
            with tempfile.NamedTemporaryFile("w", prefix="mpidl-check-", suffix=".sh") as f:
                f.write(prepared.text)
                f.flush()
                answer = controller.test_only(Path(f.name), prepared.plans[0].slurm)
            self.line("slurm", OK, f"sbatch --test-only: {answer}")
        except BadInput as e:
            self.line("slurm", FAIL, str(e))

    def estimate(self) -> None:
        a = self.first
        if "estimate" not in self.asked:
            self.not_asked("estimate")
            return
        if a is None:
            self.line("estimate", SKIPPED, "no run")
            return
        starts = [x for recs in a.events("start").values() for x in recs]
        batch = f"batch {starts[0]['batch']} a rank, " if starts and starts[0]["batch"] else ""
        times = [m["step_time"] for m in a.metrics() if "step_time" in m][1:]  # the first step warms up
        probe = [x["probe_s"] for recs in a.events("step").values() for x in recs]
        peaks = [x["peak_rss_mib"] for recs in a.events("end").values() for x in recs]
        if not times or not peaks:
            self.line("estimate", SKIPPED, "the run did not finish")
            return
        ms = 1000 * max(0.0, statistics.median(times) - (statistics.median(probe) if probe else 0.0))
        self.line("estimate", OK, f"{ms:.1f} ms a step on {ranks_of(self.ranks, 'CPU ')} here ({batch}median of "
                                  f"{len(times)} steps); peak memory {max(peaks):.0f} MiB a rank")


class ScriptChecker(Checker):
    """`mpidl check [RESOURCES.yaml] -- CMD`: your own loop on `mpidl.Run`, run as `mpidl scale`
    runs one: the run folder in MPIDL_OUTPUT (a folder of the check's), MPIDL_STEPS, a record a
    step; the Run itself hands the probe what it sees. Its data is its own: no slice."""

    def __init__(self, program: list[str], resources: Optional[str], *args, **kwargs):
        super().__init__(resources or "", *args, **kwargs)
        self.program, self.resources = list(program), resources

    def command(self, sets: list[str], run_dir: Path, resume: bool) -> tuple[list[str], dict[str, str]]:
        # A resumed run is the same command: a Run resumes from its folder's checkpoint (resume="auto").
        return self.program, {"MPIDL_OUTPUT": str(run_dir), "MPIDL_STEPS": str(self.steps), "MPIDL_LOG_EVERY": "1"}

    def prepared(self):
        from mpidl.slurm import command

        return command.prepare(self.resources, {}, self.sets, self.program, array=[], cwd=Path.cwd(), venv=None)[0]

    def run(self, synthetic: bool = False, shapes: Optional[list[str]] = None, classes: Optional[int] = None) -> int:
        from mpidl.slurm import command

        t0 = time.monotonic()
        shown = " ".join(self.program)
        self.show(f"mpidl check -- {shown}: {ranks_of(self.ranks, 'CPU ')}, {self.steps} steps")
        try:
            spec = command.resources(self.resources, {}, self.sets, self.program)
            script = next((w for w in self.program[1:] if w.endswith(".py")), None)
            if shutil.which(self.program[0]) is None and not Path(self.program[0]).is_file():
                raise BadInput(f"{self.program[0]}: not found (on PATH or as a file)")
            if script is not None and not Path(script).is_file():
                raise BadInput(f"{script}: not found")
        except BadInput as e:
            self.line("spec", FAIL, str(e))
            return EXIT_BAD_INPUT
        self.line("spec", OK, (f"{self.resources}'s slurm: section validates" if self.resources else
                               "no resources file: the slurm: defaults") + f"; job {spec.name}")
        if synthetic or shapes:
            self.line("data", FAIL, "--synthetic and --shape are for job specs: your script reads its own data")
        else:
            self.line("data", SKIPPED, "your script reads its own data, all of it, as the job will")
        if self.runs_wanted:
            self.runs([])
        else:
            self.not_asked("loss", "shares", "weights", "preemption", "resume")
        self.slurm()
        self.estimate()
        return self.verdict(t0)


def _digest(hashes: dict[str, str]) -> str:
    import hashlib

    return hashlib.blake2b("".join(hashes[k] for k in sorted(hashes)).encode(), digest_size=6).hexdigest()


def check(job: Optional[str], sets: list[str], *, ranks: int = 2, steps: int = 8, synthetic: bool = False,
          shapes: Optional[list[str]] = None, classes: Optional[int] = None, timeout: float = 300,
          out: Optional[Path] = None, program: Optional[list[str]] = None,
          show: Callable[[str], None] = print, only: Optional[list[str]] = None) -> int:
    """Run the checks, print the table; the exit status. `program`: a command on `mpidl.Run`
    (`job` is then its resources file, or None). `out`: keep the runs there (else a temporary
    folder, kept only when a check failed). `only`: these lines and what they need (None: all)."""
    if program is None and job is None:
        raise BadInput("mpidl check: give a job spec (JOB.yaml), or a command after `--`")
    if program is not None and not program:
        raise BadInput("mpidl check: no command after `--` (e.g. -- python train.py)")
    if ranks < 1:
        raise BadInput(f"-n {ranks}: at least 1 rank")
    if steps < 6:
        raise BadInput(f"--steps {steps}: at least 6 (an epoch, a preemption two steps into the next, a resume)")
    unknown = [name for name in only or [] if name not in LINES]
    if only is not None and (unknown or not only):
        raise BadInput(f"--only {','.join(only)}: {'unknown line ' + repr(unknown[0]) if unknown else 'no line'}; "
                       f"the lines: {', '.join(LINES)}")
    folder = Path(out) if out else Path(tempfile.mkdtemp(prefix="mpidl-check-"))
    folder.mkdir(parents=True, exist_ok=True)
    if program is not None:
        checker: Checker = ScriptChecker(program, job, sets, ranks, steps, folder.absolute(), timeout, show, only)
    else:
        assert job is not None  # refused above without a command
        checker = Checker(job, sets, ranks, steps, folder.absolute(), timeout, show, only)
    code = EXIT_BAD_INPUT
    try:
        code = checker.run(synthetic=synthetic, shapes=shapes, classes=classes)
    finally:
        if out is None and code in (0, EXIT_BAD_INPUT):
            shutil.rmtree(folder, ignore_errors=True)
        else:
            show(f"runs and logs: {folder}")
    return code
