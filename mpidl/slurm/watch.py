"""`mpidl submit --wait`: follow rank 0's log until the job ends, then tell how it ended.

Without an accounting database `sacct` fails, so the final state comes from:
1. `scontrol show job` while the controller knows the job (MinJobAge, 300 s by default, after
   it ends): JobState, ExitCode and Restarts;
2. after that, the record the batch script itself appends to rank 0's log as its last line,
   `[mpidl] job step exit status N (restart R)`;
3. neither: the job ended without a record (cancelled, timed out or its node failed).
The failing rank's error is read from the ranks' logs: mpidl prints a bad input as
`[rank N] error: ...` and an exception as a traceback prefixed `[rank N]`.
"""
from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, TextIO

from mpidl.errors import EXIT_BAD_INPUT, BadInput
from mpidl.slurm import controller
from mpidl.slurm.script import EXIT_RECORD

_RECORD = re.compile(re.escape(EXIT_RECORD) + r" (\d+) \(restart (\d+)\)")
_ERROR = re.compile(r"^(?:\[rank (\d+)\] )?error: (.*)$")
_RANKED = re.compile(r"^\[rank (\d+)\] (.*)$")


@dataclass
class Job:
    """A submitted job (or array element) and where its logs are."""

    job_id: str
    run_dir: Path
    rank0_logs: list[Path]          # followed by --wait; the first holds the exit record
    log_dir: Path                   # every rank's logs: log_dir.glob(log_pattern)
    log_pattern: str
    variant: list[str] = field(default_factory=list)


@dataclass
class Outcome:
    state: str
    status: Optional[int]           # the job step's exit status, when known
    restarts: int
    error: Optional[str] = None     # the failing rank's message

    @property
    def exit_code(self) -> int:
        """0, 2 for the job's bad input, 1 otherwise."""
        if self.status == 0 and self.state in ("COMPLETED", "RECORDED"):
            return 0
        return EXIT_BAD_INPUT if self.status == EXIT_BAD_INPUT else 1


class Tail:
    """New complete lines of a growing file."""

    def __init__(self, path: Path):
        self.path, self.offset, self.partial = path, 0, b""

    def read(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        data = self.partial + data
        *lines, self.partial = data.split(b"\n")
        return [ln.decode(errors="replace") for ln in lines]


def last_record(log: Path) -> Optional[tuple[int, int]]:
    """(status, restart) from the newest exit record in the log, or None."""
    try:
        text = log.read_text(errors="replace")
    except FileNotFoundError:
        return None
    found = _RECORD.findall(text)
    return (int(found[-1][0]), int(found[-1][1])) if found else None


def failing_error(paths: list[Path]) -> Optional[str]:
    """The failing rank's message: a one-line `error:` first, else a traceback's last line."""
    errors: list[str] = []
    tracebacks: dict[int, str] = {}
    plain: list[str] = []
    for path in sorted(paths):
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            m = _ERROR.match(line)
            if m:
                errors.append(line)
                continue
            m = _RANKED.match(line)
            if m and m.group(2)[:1] not in (" ", "\t", "") and not m.group(2).startswith(("Traceback", "received ")):
                if re.match(r"[\w.]+(Error|Exception|Interrupt|Exit)\b", m.group(2)):
                    tracebacks[int(m.group(1))] = line
            elif line.strip() and not line.startswith(("submitit ", "srun: ", "slurmstepd")) and ".err" in path.name:
                plain.append(line)
    if errors:
        return errors[0]
    if tracebacks:
        return tracebacks[min(tracebacks)]
    return plain[-1] if plain else None


def outcome(job: Job, info: Optional[dict]) -> Outcome:
    """How the job ended: scontrol while it knows the job, else the job's own record."""
    record = last_record(job.rank0_logs[0])
    if info is not None:
        state = info.get("JobState", "UNKNOWN")
        restarts = int(info.get("Restarts", "0") or 0)
        code, _, sig = info.get("ExitCode", "0:0").partition(":")
        status: Optional[int] = int(code) if code.isdigit() else None
        if sig not in ("", "0") and status == 0:
            status = 128 + int(sig)
        if state not in ("COMPLETED", "FAILED") and record is not None and record[1] == restarts:
            status = record[0]
    elif record is not None:
        state, status, restarts = "RECORDED", record[0], record[1]
    else:
        state, status, restarts = "UNKNOWN", None, 0
    out = Outcome(state, status, restarts)
    if out.exit_code != 0:
        out.error = failing_error(sorted(job.log_dir.glob(job.log_pattern)))
    return out


def _say(text: str, stream: TextIO = sys.stdout) -> None:
    stream.write(text + "\n")
    stream.flush()


def wait(jobs: list[Job], poll_s: float = 2.0, follow: bool = True, out: Optional[TextIO] = None,
         deadline: Optional[float] = None) -> list[Outcome]:
    """Poll until every job has ended; print rank 0's log lines (follow) and state changes to `out`
    (standard output by default). deadline: a time.monotonic() past which TimeoutError is raised
    (the jobs are left as they are: the caller decides)."""
    stream = out or sys.stdout
    tails = [Tail(p) for p in jobs[0].rank0_logs] if follow and len(jobs) == 1 else []
    seen: dict[str, str] = {}
    done: dict[str, Optional[dict]] = {}
    failures = 0
    while len(done) < len(jobs):
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {', '.join(j.job_id for j in jobs if j.job_id not in done)} still running")
        for t in tails:
            for line in t.read():
                _say(line, stream)
        for job in jobs:
            if job.job_id in done:
                continue
            try:
                info = controller.show_job(job.job_id)
                failures = 0
            except BadInput:
                failures += 1  # a controller that does not answer for a minute ends the wait
                if failures > 30:
                    raise
                continue
            state = info.get("JobState", "UNKNOWN") if info else "GONE"
            note = f"{state} (restart {info.get('Restarts', '0')})" if info else state
            if info and state == "PENDING" and info.get("Reason") not in (None, "None"):
                note += f", reason {info['Reason']}"
            if seen.get(job.job_id) != note:
                seen[job.job_id] = note
                _say(f"[mpidl] job {job.job_id}: {note}", stream)
            if info is None or state in controller.FINAL_STATES:
                done[job.job_id] = info
        if len(done) < len(jobs):
            time.sleep(poll_s)
    time.sleep(0.5 if tails else 0)  # the last lines reach the log as the job ends
    for t in tails:
        for line in t.read():
            _say(line, stream)
    return [outcome(job, done[job.job_id]) for job in jobs]


def report(job: Job, out: Outcome, stream: Optional[TextIO] = None, errors: Optional[TextIO] = None) -> None:
    """One line for the end of a single job (to `stream`, standard output by default), plus the
    failing rank's error (to `errors`, standard error by default)."""
    status = "?" if out.status is None else str(out.status)
    _say(f"[mpidl] job {job.job_id} ended: {out.state}, exit status {status}, {out.restarts} restart(s); "
         f"run folder {job.run_dir}", stream or sys.stdout)
    if out.error:
        _say(out.error, errors or sys.stderr)


def final_metrics(run_dir: Path) -> dict:
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    row = {"step": summary.get("global_step")}
    row.update({k: v for k, v in (summary.get("final") or {}).items()})
    if summary.get("samples_per_s"):
        row["samples/s"] = round(summary["samples_per_s"])
    return row


def table(jobs: list[Job], outs: list[Outcome]) -> str:
    """The array's elements side by side: variant, state, exit, final metrics."""
    rows = []
    for job, out in zip(jobs, outs):
        row = {"job": job.job_id, "variant": " ".join(job.variant), "state": out.state,
               "exit": "?" if out.status is None else out.status}
        for k, v in final_metrics(job.run_dir).items():
            row[k] = f"{v:.4f}" if isinstance(v, float) else v
        rows.append(row)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[str(row.get(k, "")) for k in keys] for row in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*row).rstrip() for row in [keys, *cells])


def worst(outs: list[Outcome]) -> int:
    codes = [o.exit_code for o in outs]
    return 1 if 1 in codes else (EXIT_BAD_INPUT if EXIT_BAD_INPUT in codes else 0)

