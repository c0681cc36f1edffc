"""Run a study: every (size, nodes, backend, repetition) point is a real `mpidl train` (or the
study's command, on mpidl.Run, with the point in its environment: `point_env`) under the launcher
(a size runs at every node count of `launcher.nodes` that divides it; 1 by default).

Order: repetitions are the outer loop; within one, sizes go up on even repetitions and down
on odd ones, and so do a size's node counts; at each placement the backends (baseline
included) rotate. Drift on a noisy machine then hits every size and backend alike, and a
backend is always measured close in time to the baseline it is compared with at the same size
and placement.

A run's figures come from the trainer's metrics.jsonl: log windows of `window` steps that
start after `warmup_steps` (evaluation and checkpoints fall outside windows). Per run the
median over its windows; per point the median, min and max over repetitions.

Files: <output>/study.json (rewritten atomically after every run; `complete` at the end),
<output>/runs/p<P>-<backend>-r<k>/ (on one node) or p<P>-n<N>-<backend>-r<k>/ (on N nodes):
metrics.jsonl, summary.json, output.log (the launcher's), checkpoints removed; the slurm
launcher adds submitit's logs under slurm/. <output>/allreduce.json (when the study names a
bench_allreduce result).
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from mpidl.errors import BadInput
from mpidl.scaling import efficiency, environment
from mpidl.scaling.efficiency import BASELINE
from mpidl.scaling.launch import Launcher, make_launcher, mpidl_command, unreachable
from mpidl.scaling.study import Study
from mpidl.spec import JobSpec, load_spec


def training_rows(job: JobSpec) -> tuple[int, str]:
    """(rows the trainer will train on, where that number comes from), without MPI."""
    d = job.data
    files = d.files
    if isinstance(files, str) and not any(c in files for c in "*?[") and not os.path.exists(files) and d.synth:
        rows, where = d.synth.rows, f"{files} (data.synth.rows, generated on first use)"
    else:
        from mpidl.data import H5Source

        rows, where = len(H5Source(files, keys=d.keys).validate()), str(files)
    if d.val_files is None:
        rows -= int(round(rows * d.val_fraction))
    return rows, where


def check_feasible(study: Study) -> None:
    """Refuse, before anything runs, what some point could not do (one line, BadInput)."""
    s, origin = study.spec, study.origin
    if s.mode == "strong":
        assert s.global_batch is not None
        bad = [p for p in s.sizes if s.global_batch % p]
        if bad:
            raise BadInput(f"{origin}: sizes: global_batch = {s.global_batch} does not divide by {bad[0]} ranks "
                           "(strong scaling keeps the global batch: choose sizes that divide it)")
    rows, where = training_rows(study.job) if study.job else (None, "")
    acc = study.job.accumulate if study.job else 1
    for p in sorted(s.sizes, reverse=True) if rows is not None else []:
        need = p * study.batch_per_rank(p) * acc
        assert rows is not None  # the loop runs only then
        if need > rows:
            raise BadInput(f"{origin}: sizes: {p} ranks need {need} samples per step "
                           f"({p} × batch {study.batch_per_rank(p)}{f' × accumulate {acc}' if acc > 1 else ''}), "
                           f"more than the {rows} training rows of {where}")
    why_not = unreachable(s.launcher.name)
    if why_not:
        raise BadInput(f"{origin}: launcher.name = {s.launcher.name!r}: {why_not}")
    missing = missing_backends(s.runs)
    if missing:
        name, why = missing[0]
        raise BadInput(f"{origin}: backends: {name} is not installed here ({why})")


_PROBES = {
    "horovod": "import horovod.torch",
    "ddp": "import torch.distributed as d; assert d.is_available(), 'torch.distributed is not available'",
    "mpi": "import mpi4py",
    BASELINE: "import mpi4py",
}


def missing_backends(names: list[str]) -> list[tuple[str, str]]:
    """Backends that do not import in the interpreter the ranks run (a subprocess: no MPI here)."""
    out = []
    for name in names:
        p = subprocess.run([sys.executable, "-c", _PROBES[name]], capture_output=True, text=True, timeout=120)
        if p.returncode:
            lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
            out.append((name, lines[-1] if lines else f"exit {p.returncode}"))
    return out


@dataclass(frozen=True)
class Point:
    order: int
    rep: int
    size: int
    backend: str
    nodes: int = 1

    @property
    def key(self) -> str:
        where = f"-n{self.nodes}" if self.nodes > 1 else ""  # one node: the names studies always had
        return f"p{self.size}{where}-{self.backend}-r{self.rep}"


def plan(sizes: list[int], backends: list[str], repetitions: int, nodes: tuple[int, ...] = (1,)) -> list[Point]:
    """The interleaved order of runs (see the module's docstring)."""
    out: list[Point] = []
    for rep in range(repetitions):
        down = bool(rep % 2)
        for size in sorted(sizes, reverse=down):
            for n in sorted((n for n in nodes if size % n == 0), reverse=down):
                k = rep % len(backends)
                for b in backends[k:] + backends[:k]:
                    out.append(Point(len(out), rep, size, b, n))
    return out


def overrides(study: Study, point: Point, run_dir: Path) -> list[str]:
    """The study's --set items, then what the point fixes (those win)."""
    s = study.spec
    where = json.dumps(str(run_dir).replace("{", "{{").replace("}", "}}"))  # a YAML string; output is formatted
    return [*s.set, f"name={json.dumps(f'{s.name}-{point.key}')}", f"steps={s.warmup_steps + s.steps}", "epochs=null",
            f"log_every={s.window}", f"data.batch={study.batch_per_rank(point.size)}", f"backend={point.backend}",
            f"output={where}", f"checkpoint.dir={json.dumps(str(run_dir / 'checkpoints'))}",
            "checkpoint.every_steps=null", "checkpoint.every_epochs=null"]


def windows(metrics: Path, warmup: int) -> list[dict]:
    """The training log windows of a run that start at or after `warmup` steps."""
    out, prev = [], 0
    for line in metrics.read_text().splitlines():
        rec = json.loads(line)
        if "step_time" not in rec:
            continue  # an evaluation record
        start, prev = prev, rec["step"]
        if start >= warmup:
            w = {"start": start, "steps": rec["step"] - start, "step_time": rec["step_time"],
                 "samples_per_s": rec["samples_per_s"]}
            if isinstance(rec.get("time"), dict):
                w["time"] = {k: rec["time"].get(k) for k in efficiency.BUCKETS}
            out.append(w)
    return out


def run_figures(run_dir: Path, warmup: int) -> dict:
    """A finished run's figures: medians over its measured windows."""
    ws = windows(run_dir / "metrics.jsonl", warmup)
    if not ws:
        raise ValueError(f"{run_dir}: no log window after the {warmup} warm-up steps")
    fig = {"windows": ws, "step_time": statistics.median(w["step_time"] for w in ws),
           "throughput": statistics.median(w["samples_per_s"] for w in ws)}
    if all("time" in w for w in ws):
        fig["breakdown"] = {k: statistics.median(w["time"][k] for w in ws) for k in efficiency.BUCKETS}
        fig["breakdown_source"] = "metrics.jsonl windows after warm-up"
    else:
        summary = json.loads((run_dir / "summary.json").read_text())
        fig["breakdown"] = {k: summary["step_time_breakdown_s"][k] for k in efficiency.BUCKETS}
        fig["breakdown_source"] = "summary.json (the whole run, warm-up included)"
    return fig


def aggregate(runs: list[dict]) -> dict[tuple[str, int, int], dict]:
    """Per (backend, size, nodes): median, min and max over the successful repetitions."""
    groups: dict[tuple[str, int, int], list[dict]] = {}
    for r in runs:
        if r.get("throughput") is not None:
            groups.setdefault((r["backend"], r["size"], r.get("nodes", 1)), []).append(r)
    out = {}
    for key, rs in groups.items():
        out[key] = {"backend": key[0], "size": key[1], "nodes": key[2], "ranks_per_node": key[1] // key[2],
                    "oversubscribed": rs[0]["oversubscribed"],
                    "batch_per_rank": rs[0]["batch_per_rank"], "global_batch": rs[0]["global_batch"],
                    "throughput": efficiency.spread(r["throughput"] for r in rs),
                    "step_time": efficiency.spread(r["step_time"] for r in rs),
                    "breakdown": {k: efficiency.spread(r["breakdown"][k] for r in rs) for k in efficiency.BUCKETS},
                    "breakdown_source": rs[0]["breakdown_source"]}
    return out


def _grad_params(study: Study, runs: list[dict], out: Path) -> Optional[int]:
    """Trainable parameters of the job's model (what each step allreduces), built as the trainer
    does; for a command, as its runs' summaries report them."""
    if study.job is None:
        for r in runs:
            try:
                return json.loads((out / r["run_dir"] / "summary.json").read_text())["parameters"]
            except (OSError, ValueError, KeyError):
                continue
        return None
    try:
        from mpidl.data import H5Source
        from mpidl.train.models import model_for

        src = H5Source(study.job.data.files, keys=study.job.data.keys).validate()
        return sum(p.numel() for p in model_for(study.job, src).parameters() if p.requires_grad)
    except Exception:
        return None


def _progress_line(n: int, total: int, point: Point, reps: int, row: dict, over: bool, multinode: bool) -> str:
    where = f" on {point.nodes} node{'s' if point.nodes > 1 else ''}" if multinode else ""
    head = f"[{n:>{len(str(total))}}/{total}] p={point.size}{where} {point.backend} rep {point.rep + 1}/{reps}"
    if row.get("throughput") is None:
        return f"{head}: FAILED ({row['error']})"
    b = row["breakdown"]
    parts = " ".join(f"{k} {1e3 * b[k]:.1f}" for k in efficiency.BUCKETS)
    return (f"{head}: {row['throughput']:,.0f} samples/s, {1e3 * row['step_time']:.1f} ms/step "
            f"({parts} ms){' [oversubscribed]' if over else ''}")


class StudyFailed(RuntimeError):
    """Every run of the first size failed: a broken set-up (launcher, environment), not bad input."""


def _last_words(log_tail: str) -> str:
    """The line of a failed run's output that says why: the last naming an error, else the last
    with words in it (mpirun frames its messages in dashes)."""
    lines = [ln.strip() for ln in log_tail.splitlines() if any(c.isalnum() for c in ln)]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or ["no output"])[-1]


def _argv(study: Study, point: Point, run_dir: Path) -> list[str]:
    """The command line of a point's ranks: `mpidl train JOB --set ...`, or the study's command."""
    if study.command is not None:
        return list(study.command)
    argv = [*mpidl_command(), "train", str(study.job_path)]
    for item in overrides(study, point, run_dir):
        argv += ["--set", item]
    return argv


def point_env(study: Study, point: Point, run_dir: Path) -> dict[str, str]:
    """What a command's mpidl.Run takes from the environment at a point (a job: nothing)."""
    if study.command is None:
        return {}
    from mpidl.train.run import BACKEND_ENV, LOG_EVERY_ENV, OUTPUT_ENV, STEPS_ENV

    s = study.spec
    venv_bin = str(Path(sys.executable).parent)  # `python` in the command is this environment's, as under submit
    return {"PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""), BACKEND_ENV: point.backend,
            OUTPUT_ENV: str(run_dir.absolute()), STEPS_ENV: str(s.warmup_steps + s.steps),
            LOG_EVERY_ENV: str(s.window), "MPIDL_BATCH_PER_RANK": str(study.batch_per_rank(point.size))}


def _misplaced(run_dir: Path, point: Point) -> Optional[str]:
    """Why the ranks did not run where the point says (rank 0's node held size / nodes ranks), or None."""
    world = json.loads((run_dir / "summary.json").read_text()).get("world") or {}
    want = point.size // point.nodes
    if world.get("local_size", want) != want:
        return (f"placement: {point.nodes} node(s) × {want} rank(s) asked, but rank 0's node ({world.get('host')}) "
                f"held {world['local_size']} rank(s)")
    return None


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def run_study(study: Study, *, force: bool = False, echo: Callable[[str], None] = print,
              launcher: Optional[Launcher] = None, dry_run: bool = False) -> dict:
    """Run every point; returns the study's JSON (also written to <output>/study.json). With
    `dry_run`, only the checks: every point's job validated and each placement judged by its
    launcher (SLURM: sbatch --test-only), how each starts echoed; nothing runs or is written."""
    s = study.spec
    check_feasible(study)
    out = study.output
    if (out / "study.json").exists() and not force and not dry_run:
        raise BadInput(f"{out}/study.json: a study is already there (mpidl scale --force replaces it)")
    for p in s.sizes if study.job_path else []:  # every point's full job spec validates before the first run starts
        for b in s.runs:
            assert study.job_path is not None  # the loop runs only then
            load_spec(study.job_path, overrides(study, Point(0, 0, p, b), out / "runs" / "x"))
    if study.allreduce is not None and not study.allreduce.exists():
        raise BadInput(f"{study.origin}: allreduce = {study.spec.allreduce}: file not found")
    launcher = launcher or make_launcher(study, environment.cores())
    placements = []
    for p in s.sizes:  # and the launcher can place it (SLURM: sbatch --test-only of each placement)
        for n in s.node_counts(p):
            point = Point(0, 0, p, s.runs[0], n)
            try:
                how = launcher.check(p, n, _argv(study, point, out / "runs" / point.key))
            except BadInput as e:
                raise BadInput(f"{study.origin}: launcher.nodes: {p} ranks on {n} node(s): {e}") from None
            placements.append((p, n, how))
    if dry_run:
        echo(f"study {s.name}: {len(placements)} placement(s) checked by {launcher.name}, nothing run "
             f"(backends {', '.join(s.runs)}, {s.repetitions} repetition(s) each):")
        for p, n, how in placements:
            echo(f"  {p} rank(s) on {n} node(s): {how}")
        return {"dry_run": True, "placements": [{"size": p, "nodes": n, "start": how} for p, n, how in placements]}
    if force:
        shutil.rmtree(out / "runs", ignore_errors=True)
    created = not out.exists()
    (out / "runs").mkdir(parents=True, exist_ok=True)
    if study.allreduce is not None:
        shutil.copyfile(study.allreduce, out / "allreduce.json")

    env = environment.probe(out)
    env["launcher"] = launcher.describe()
    multinode = s.launcher.nodes != [1]
    points = plan(s.sizes, s.runs, s.repetitions, tuple(s.launcher.nodes))
    doc: dict = {"kind": "mpidl scaling study", "complete": False, "study": s.model_dump(mode="json"),
                 "study_file": str(study.origin), "job_file": study.what,
                 "job": study.job.redacted_dump() if study.job else {"command": study.command}, "environment": env,
                 "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "runs": []}
    echo(f"study {s.name}: {s.mode} scaling, sizes {s.sizes}"
         + (f" on {s.launcher.nodes} nodes (each size at every count that divides it)" if multinode else "")
         + f", backends {', '.join(s.runs)}, {s.repetitions} repetition(s): {len(points)} runs of "
         f"{s.warmup_steps}+{s.steps} steps" + (" (one SLURM job each)" if s.launcher.name == "slurm" else "")
         + f" -> {out}")
    run_env = {**os.environ, "MPIDL_PROGRESS": "lines", "PYTHONUNBUFFERED": "1"}
    if s.threads_per_rank:
        run_env["OMP_NUM_THREADS"] = str(s.threads_per_rank)
    for n, point in enumerate(points, 1):
        run_dir = out / "runs" / point.key
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        over = launcher.oversubscribed(point.size, point.nodes)
        load_before = os.getloadavg()[0]
        done = launcher.run(point.size, _argv(study, point, run_dir), nodes=point.nodes,
                            env={**run_env, **point_env(study, point, run_dir)}, cwd=Path.cwd(), timeout=s.timeout_s,
                            log=run_dir / "output.log")
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        row: dict = {"order": point.order, "rep": point.rep, "size": point.size, "nodes": point.nodes,
                     "backend": point.backend, "oversubscribed": over,
                     "batch_per_rank": study.batch_per_rank(point.size),
                     "global_batch": study.global_batch(point.size), "returncode": done.returncode,
                     "seconds": done.seconds, "run_dir": str(run_dir.relative_to(out)),
                     # runnable processes on the machine (1-minute average), before and after: on a
                     # shared machine, what else competed with the ranks for the cores
                     "load_before": load_before, "load_after": os.getloadavg()[0]}
        if done.returncode == 2:  # bad input the checks above could not see: leave nothing half-written
            last = [ln for ln in done.output_tail.splitlines() if "error:" in ln] or done.output_tail.splitlines()
            shutil.rmtree(out if created and not doc["runs"] else run_dir, ignore_errors=True)
            why = last[-1].strip() if last else "exit 2"
            why = why.split("error: ", 1)[1] if "error: " in why else why
            raise BadInput(f"{study.origin}: run {point.key}: the trainer refused the job: {why}")
        if done.returncode or done.timed_out:
            row["error"] = ("timed out after %.0f s" % s.timeout_s if done.timed_out
                            else f"exit {done.returncode}: {_last_words(done.output_tail)}")
        else:
            try:
                misplaced = _misplaced(run_dir, point)
                if misplaced:
                    row["error"] = misplaced
                else:
                    row.update(run_figures(run_dir, s.warmup_steps))
            except (OSError, ValueError, KeyError) as e:
                row["error"] = str(e)
        doc["runs"].append(row)
        echo(_progress_line(n, len(points), point, s.repetitions, row, over, multinode))
        _summarise(doc, study)
        write_json(out / "study.json", doc)
        if n == len(s.runs) and all(r.get("throughput") is None for r in doc["runs"]):
            # every backend failed at the first size: the set-up is broken, not one point
            raise StudyFailed(f"{out / 'study.json'}: the first {n} runs all failed, so the study stops; "
                              f"the first: {doc['runs'][0]['error']} "
                              f"(see {out / doc['runs'][0]['run_dir']}/output.log)")

    doc["model_inputs"] = {"grad_params": _grad_params(study, doc["runs"], out)}
    doc["failed_runs"] = sum(1 for r in doc["runs"] if r.get("throughput") is None)
    doc["complete"] = True
    doc["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    _summarise(doc, study)
    write_json(out / "study.json", doc)
    return doc


def _summarise(doc: dict, study: Study) -> None:
    s = study.spec
    pts = aggregate(doc["runs"])
    doc["points"] = list(pts.values())
    doc["table"] = efficiency.table(pts, s.mode, BASELINE, s.flag_below)
    doc["goals"] = efficiency.goals(doc["table"], s.mode, BASELINE)
    doc["crossing"] = efficiency.crossing(doc["table"], BASELINE)
