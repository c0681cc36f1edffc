"""One sweep task: the trainer, in this process, on a world of one rank.

The task gets `world_for(MPI.COMM_SELF)`: to the Trainer it is a whole job of size 1 (its
loader takes every row, nothing is averaged, its rank 0 writes the run's record), while the
job's other ranks run tasks of their own. Its output (progress, log) goes to `task.log` in the
task's folder, not to the terminal; an exception fails the task alone: it is recorded with its
error (the traceback in task.log) and the sweep goes on. A task that was cut off resumes from
its own newest checkpoint when the sweep runs again.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Iterator, Optional

from mpidl.sweep.plan import Task


def cores_per_rank(world) -> int:
    """The cores this rank may use: those it is bound to, else its share of the node's."""
    mine = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    total = os.cpu_count() or mine
    if mine < total:  # the launcher bound the rank (mpirun --bind-to core, srun --cpu-bind)
        return mine
    return max(1, total // max(1, world.local_size))


@contextlib.contextmanager
def captured(path: Path) -> Iterator[Any]:
    """stdout, stderr and the mpidl log into `path` (appended) for the duration."""
    logger = logging.getLogger("mpidl")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        handler = logging.StreamHandler(f)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        saved, level = logger.handlers[:], logger.level
        logger.handlers = [handler]
        logger.setLevel(logging.INFO)  # other ranks log warnings only, to the terminal
        try:
            yield f
        finally:
            logger.handlers = saved
            logger.setLevel(level)


def metric_of(summary: dict, name: str) -> Optional[float]:
    """`name` from the summary's held-out metrics, else from the summary (a.b for nested keys)."""
    if name in (summary.get("final") or {}):
        return summary["final"][name]
    node: Any = summary
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node if isinstance(node, (int, float)) and not isinstance(node, bool) else None


def last_evaluation(run_dir: Path) -> dict:
    """The newest held-out record in the run's metrics: a task resumed at its end (cut off after
    its last checkpoint, before its result was written) trains no step and evaluates nothing."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return {}
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "val_loss" in rec:
            return {k: v for k, v in rec.items() if k.startswith("val_")}
    return {}


def run_task(task: Task, world_one, rank: int, threads: int, metric: str) -> dict:
    """Train the task; its result (status ok / failed / interrupted)."""
    from mpidl.train.trainer import train

    result: dict[str, Any] = {"task": task.id, "index": task.index, "params": task.params, "rank": rank,
                              "threads": threads, "run": str(task.spec.run_dir)}
    t0 = time.time()
    with captured(task.spec.run_dir / "task.log") as log:
        try:
            summary = train(task.spec, resume="auto", world=world_one)
        except Exception as e:
            traceback.print_exc(file=log)
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            result.update(status="failed", error=f"{type(e).__name__}: {first}"[:300])
        else:
            preempted = summary.get("preempted")
            summary["final"] = summary.get("final") or last_evaluation(task.spec.run_dir)
            result.update(status="interrupted" if preempted else "ok", metric=metric_of(summary, metric),
                          final=summary["final"], steps=summary.get("global_step"),
                          samples_per_s=summary.get("samples_per_s"), stop=bool(preempted))
    result["seconds"] = time.time() - t0
    sys.stdout.flush()
    return result
