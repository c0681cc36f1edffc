"""A sweep's results: one result.json per finished task (the sweep's state), and the table.

Rank 0 writes each task's result atomically into the task's folder as it arrives, so a sweep
stopped at any moment knows what it finished. The table lists every task of the sweep, the
finished ones sorted by the metric (best first), then the failed ones with their error, then
those not run yet; it is printed and written as results.csv and results.json.
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Optional

from mpidl.sweep.plan import SweepSpec, Task


def result_path(task: Task) -> Path:
    return task.spec.run_dir / "result.json"


def read_done(tasks: list[Task]) -> dict[str, dict]:
    """The results on disk of these tasks, by task id (unreadable ones count as not run)."""
    done = {}
    for t in tasks:
        try:
            done[t.id] = json.loads(result_path(t).read_text())
        except (OSError, ValueError):
            pass
    return done


def write_result(task: Task, result: dict) -> None:
    path = result_path(task)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)


def rows(sweep: SweepSpec, tasks: list[Task], done: dict[str, dict]) -> list[dict]:
    """One row per task, in table order."""
    out = []
    for t in tasks:
        r = done.get(t.id, {})
        out.append({"task": t.id, "status": r.get("status", "not run"), sweep.metric: r.get("metric"),
                    **t.params, "seconds": round(r["seconds"], 2) if "seconds" in r else None, "rank": r.get("rank"),
                    "error": r.get("error", "")})
    sign = -1 if sweep.mode == "max" else 1

    def order(row: dict) -> tuple:
        value = row[sweep.metric]
        if row["status"] == "ok":
            has = isinstance(value, (int, float)) and math.isfinite(value)
            return (0, 0 if has else 1, sign * value if has else 0)
        return ({"failed": 1}.get(row["status"], 2), 0, 0)
    return sorted(out, key=order)


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return v if isinstance(v, str) else json.dumps(v)


def render(table: list[dict], width: int = 60) -> str:
    if not table:
        return "(no tasks)"
    cols = list(table[0])
    cells = [cols] + [[_cell(r[c])[:width] for c in cols] for r in table]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def write_table(sweep: SweepSpec, table: list[dict], extra: Optional[dict] = None) -> None:
    out = sweep.out_dir
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"results.csv.tmp{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]) if table else ["task"])
        writer.writeheader()
        for r in table:
            writer.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()})
    os.replace(tmp, out / "results.csv")
    doc = {"name": sweep.name, "metric": sweep.metric, "mode": sweep.mode, **(extra or {}), "tasks": table}
    tmp = out / f"results.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, out / "results.json")
