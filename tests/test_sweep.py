"""`mpidl sweep` under real mpirun: tasks over the ranks with dynamic load balancing, failures
recorded, the sorted table, resuming, and bad sweep files."""
from __future__ import annotations

import csv
import json
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from conftest import MPIRUN, ROOT, clean_env, cli_in_turn, mpidl_cmd, mpirun
from mpidl.errors import BadInput
from mpidl.sweep import plan


def base_job(folder: Path) -> None:
    (folder / "base.yaml").write_text(yaml.safe_dump({
        "name": "base", "seed": 3, "epochs": 1,
        "data": {"files": str(folder / "tab.h5"), "batch": 16, "val_fraction": 0.1,
                 "synth": {"kind": "tabular", "rows": 2000, "features": 8, "classes": 3, "rule": "nonlinear"}},
        "model": {"name": "mlp", "args": {"hidden": [32], "num_classes": 3}},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "checkpoint": {"every_epochs": 1000}, "log_every": 1000,
    }))


def sweep_file(folder: Path, **body) -> str:
    base_job(folder)
    doc = {"name": "s", "job": "base.yaml", "output": str(folder / "out"), **body}
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(path)


def results(folder: Path) -> list[dict]:
    return json.loads((folder / "out" / "results.json").read_text())["tasks"]


def test_sweep_records_failures_sorts_and_resumes(tmp_path):
    path = sweep_file(tmp_path, grid={"optimizer.lr": [0.02, 0.1], "data.batch": [16, 5000]},
                      random={"trials": 2, "seed": 5, "fields": {"optimizer.momentum": {"uniform": [0.5, 0.95]}}})
    r = mpirun(2, mpidl_cmd("sweep", path), timeout=600)
    assert r.returncode == 0, r.output[-3000:]
    assert "8 tasks, 0 done before, 8 to run on 2 rank(s)" in r.stdout
    assert "samples/s" not in r.stdout  # the tasks' own progress went to their task.log
    table = results(tmp_path)
    assert len(table) == 8
    ok = [t for t in table if t["status"] == "ok"]
    failed = [t for t in table if t["status"] == "failed"]
    assert len(ok) == 4 and all(t["data.batch"] == 16 for t in ok)
    assert [t["val_accuracy"] for t in ok] == sorted((t["val_accuracy"] for t in ok), reverse=True)
    assert table[:4] == ok  # the finished tasks first, best first, then the failed ones
    assert len(failed) == 4 and all("fewer than ranks × batch" in t["error"] for t in failed)
    rows = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    assert [row["task"] for row in rows] == [t["task"] for t in table]
    for t in table:
        task_dir = tmp_path / "out" / "tasks" / t["task"]
        res = json.loads((task_dir / "result.json").read_text())
        assert res["threads"] >= 1 and res["params"]["data.batch"] == t["data.batch"]
        assert (task_dir / "task.log").exists()
    assert all((tmp_path / "out" / "tasks" / t["task"] / "summary.json").exists() for t in ok)

    # run again: nothing left to do, the same table
    r = mpirun(2, mpidl_cmd("sweep", path), timeout=300)
    assert r.returncode == 0 and "8 done before, 0 to run" in r.stdout, r.output[-3000:]
    assert results(tmp_path) == table

    # a task cut off after its last checkpoint, before its result: only it runs, from its checkpoint
    best = tmp_path / "out" / "tasks" / table[0]["task"]
    (best / "result.json").unlink()
    # and then the failed ones, asked for: both sweeps in turn by the same ranks
    r = cli_in_turn(2, [["sweep", path], ["sweep", path, "--retry-failed"]])
    assert r.stdout.count("4 done before, 4 to run") == 1, r.output[-3000:]  # the second sweep's start
    first, _ = r.stdout.split("4 done before, 4 to run")
    assert "7 done before, 1 to run" in first, r.output[-3000:]
    assert "resumed from" in (best / "task.log").read_text()
    again = results(tmp_path)
    assert [(t["task"], t["val_accuracy"]) for t in again] == [(t["task"], t["val_accuracy"]) for t in table]


def test_uneven_tasks_keep_every_rank_busy(tmp_path):
    """One long task and seven short ones on 2 ranks: the rank that drew the long task runs
    fewer (static halves would give each rank four)."""
    path = sweep_file(tmp_path, grid={"steps": [8000, 4, 5, 6, 7, 8, 9, 10]})
    r = mpirun(2, mpidl_cmd("sweep", path), timeout=600)
    assert r.returncode == 0, r.output[-3000:]
    table = results(tmp_path)
    assert all(t["status"] == "ok" for t in table)
    per_rank = Counter(t["rank"] for t in table)
    long_rank = next(t["rank"] for t in table if t["steps"] == 8000)
    assert set(per_rank) == {0, 1}
    assert per_rank[long_rank] < per_rank[1 - long_rank], per_rank


def test_preemption_signal_stops_the_sweep_and_it_resumes(tmp_path):
    """SIGUSR2 (SLURM's warning; mpirun forwards it): the running tasks stop with a checkpoint,
    no task starts, the sweep exits 0; run again, it finishes, the stopped tasks from their checkpoints."""
    path = sweep_file(tmp_path, set={"log_every": 10}, grid={"steps": [3000, 3001, 3002, 3003]})
    p = subprocess.Popen([MPIRUN, "-np", "2", *mpidl_cmd("sweep", path)], cwd=ROOT, env=clean_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tasks = tmp_path / "out" / "tasks"
    deadline = time.monotonic() + 300
    # both ranks training (before its sweep starts, a rank has no handler: the signal would end it)
    while sum(bool(f.stat().st_size) for f in tasks.glob("*/metrics.jsonl")) < 2:
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.2)
    p.send_signal(signal.SIGUSR2)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, out + err
    assert "interrupted" in out
    first = {t["task"]: t["status"] for t in results(tmp_path)}
    assert "ok" not in first.values() or list(first.values()).count("ok") < 4, first
    stopped = [t for t in tasks.iterdir() if (t / "checkpoints").is_dir() and not (t / "result.json").exists()]
    assert stopped  # a task cut off, with its checkpoint

    r = mpirun(2, mpidl_cmd("sweep", path), timeout=600)
    assert r.returncode == 0, r.output[-3000:]
    assert all(t["status"] == "ok" for t in results(tmp_path))
    assert all("resumed from" in (t / "task.log").read_text() for t in stopped)


@pytest.mark.parametrize("body,expect", [
    ({}, "empty sweep"),
    ({"grid": {"optimizer.lr": []}}, "grid.optimizer.lr is an empty list"),
    ({"grid": {"optimizer.lrate": [0.1]}}, "unknown field 'optimizer.lrate' ('lrate' is not a key of optimizer)"),
    ({"grid": {"optimizer.lr.x": [0.1]}}, "'optimizer.lr' is a value, not a section"),
    ({"grid": {"backend": ["ddp"]}}, "'backend' cannot be swept"),
    ({"grid": {"optimizer.lr": [0.1, -1]}}, "task 1 (optimizer.lr=-1): optimizer.lr = -1: Input should be greater"),
    ({"random": {"trials": 2, "fields": {"optimizer.lr": {"uniform": [0.2, 0.1]}}}}, "low 0.2 > high 0.1"),
    ({"grid": {"optimizer.lr": [0.1]}, "mode": "best"}, "mode = \"best\""),
])
def test_bad_sweep_is_one_line(tmp_path, body, expect):
    """In-process: the sweep's ranks all call plan.load (agreed: mpidl/sweep/run.py), so its one
    line is what every rank reports; the exit on every rank is tested once, below."""
    path = sweep_file(tmp_path, **body)
    with pytest.raises(BadInput) as e:
        plan.load(path)
    assert expect in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert str(e.value).startswith(path), str(e.value)  # it names the file
    assert not (tmp_path / "out").exists()


def test_bad_sweep_exits_2_on_every_rank_with_one_line(tmp_path):
    expect = "unknown field 'optimizer.lrate' ('lrate' is not a key of optimizer)"
    r = mpirun(2, mpidl_cmd("sweep", sweep_file(tmp_path, grid={"optimizer.lrate": [0.1]})), timeout=120)
    assert r.returncode == 2, r.output[-3000:]
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and expect in errors[0] and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_plan_grid_times_random_draws(tmp_path):
    path = sweep_file(tmp_path, set={"epochs": 2},
                      grid={"optimizer.lr": [0.01, 0.1], "model.args.hidden": [[16], [32]]},
                      random={"trials": 3, "seed": 1, "fields": {
                          "optimizer.weight_decay": {"log_uniform": [1e-5, 1e-3]},
                          "data.batch": {"integer": [8, 12]}, "model.name": {"choice": ["mlp"]}}})
    sweep, tasks = plan.load(path)
    assert len(tasks) == 12 and len({t.id for t in tasks}) == 12
    for t in tasks:
        assert 1e-5 <= t.params["optimizer.weight_decay"] <= 1e-3 and 8 <= t.params["data.batch"] <= 12
        assert t.spec.optimizer.lr == t.params["optimizer.lr"] and t.spec.epochs == 2
        assert t.spec.backend == "mpi" and t.spec.run_dir == tmp_path / "out" / "tasks" / t.id
    assert [t.id for t in plan.load(path)[1]] == [t.id for t in tasks]  # the same draws every time
    with pytest.raises(BadInput, match="unknown field 'data.synth.colour'"):
        plan.check_field("data.synth.colour", "x")
    plan.check_field("model.args.anything", "x")  # model arguments are checked when the model is built


@pytest.mark.parametrize("body,expect", [
    ({"random": {"trials": 2, "fields": {"optimizer.lr": {"uniform": [0.1, float("inf")]}}}},
     "random.fields.optimizer.lr.uniform.1 = .inf: Input should be a finite number"),
    ({"random": {"trials": 2, "fields": {"optimizer.lr": {"log_uniform": [float("nan"), 0.1]}}}},
     "random.fields.optimizer.lr.log_uniform.0 = .nan: Input should be a finite number"),
    ({"grid": {"optimizer.lr": [0.1, float("inf")]}}, "task 1 (optimizer.lr=Infinity): optimizer.lr = .inf"),
    ({"set": {"schedule.warmup_epochs": float("nan")}, "grid": {"optimizer.lr": [0.1]}},
     "schedule.warmup_epochs = .nan: Input should be a finite number"),
])
def test_non_finite_floats_are_refused(tmp_path, body, expect):
    with pytest.raises(BadInput) as e:
        plan.load(sweep_file(tmp_path, **body))
    assert expect in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("body,expect", [
    ({"name": "../x"}, 'name = "../x": a name is one folder name'),
    ({"output": "runs/{nme}"}, 'output = "runs/{nme}": the only placeholder is {name}'),
    ({"output": "runs/{"}, 'output = "runs/{": the only placeholder is {name}'),
    ({"output": "runs/%j"}, 'output = "runs/%j": % is refused'),
])
def test_name_and_output_are_checked_as_a_jobs(tmp_path, body, expect):
    path = sweep_file(tmp_path, grid={"optimizer.lr": [0.1]})
    tree = {**yaml.safe_load(Path(path).read_text()), **body}
    Path(path).write_text(yaml.safe_dump(tree))
    with pytest.raises(BadInput) as e:
        plan.load(path)
    assert str(e.value) == f"{path}: {expect}" or str(e.value).startswith(f"{path}: {expect}"), str(e.value)


def test_shipped_sweep_plans_six_tasks():
    sweep, tasks = plan.load(str(ROOT / "jobs" / "sweeps" / "demo.yaml"))
    assert len(tasks) == 6 and sweep.metric == "val_accuracy"
    assert {(t.spec.optimizer.lr, t.spec.model.args["width"]) for t in tasks} == \
        {(lr, w) for lr in (0.02, 0.05, 0.1) for w in (16, 32)}
    assert all(t.spec.epochs == 2 and t.spec.backend == "mpi" for t in tasks)
