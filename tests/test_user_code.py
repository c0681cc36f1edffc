"""Your own model, loss, metric and transform through a job spec, and your own loop through
`mpidl.Run`: a user package made in a temporary folder (nothing under mpidl/), trained under real
mpirun on every backend, resumed, preempted, quantized; every bad input one line, exit 2."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

import userpkg
from conftest import PYTHON, bad_input_lines, cli_in_turn, mpidl_cmd, mpirun, pycode, results, run
from test_train import BACKENDS, final_weights


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def user_runs(tmp_path_factory):
    """The user's folder, and backend -> its run: the user's job on each backend, in turn, by one
    launch of 2 ranks in that folder."""
    folder = tmp_path_factory.mktemp("user")
    userpkg.make(folder)
    argvs = []
    for backend in BACKENDS:
        job = folder / f"job-{backend}.yaml"
        job.write_text(yaml.safe_dump(userpkg.job(folder, backend=backend, name=f"user-{backend}"), sort_keys=False))
        argvs.append(["train", str(job)])
    cli_in_turn(2, argvs, cwd=folder)
    return folder, {backend: folder / "runs" / f"user-{backend}" for backend in BACKENDS}


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_user_package_trains_on_every_backend(user_runs, backend):
    tmp_path, runs = user_runs
    summary = json.loads((runs[backend] / "summary.json").read_text())
    assert summary["global_step"] == 2 * (1800 // 32) and summary["backend"] == backend
    final = summary["final"]
    assert final["val_accuracy"] > 0.5 and final["val_top2"] >= final["val_accuracy"]  # chance: 1/3, 2/3
    train_recs = [r_ for r_ in records(runs[backend]) if "loss" in r_]
    assert all("top2" in r_ and "accuracy" in r_ for r_ in train_recs)
    # the checkpoint names the user's model and where its code lies, and holds no pickled object
    ckpt = sorted((runs[backend] / "checkpoints").glob("ckpt-*.pt"))[-1]
    state = torch.load(ckpt, weights_only=True)
    assert state["spec"]["model"] == {"name": "mynets.models:TinyNet", "args": {"hidden": 32, "num_classes": 3},
                                      "channels_last": False, "compile": False}
    assert state["code_dirs"] == [str(tmp_path)]


def test_the_same_job_from_another_folder_and_quantized(tmp_path):
    """The job file's folder is searched, not the working directory; quantize rebuilds the model
    from the checkpoint's record alone."""
    user = tmp_path / "user"
    user.mkdir()
    job = userpkg.make(user, **{"data.files": str(user / "tab.h5"), "output": str(user / "run"),
                                "model.name": "mynets.models:make_net", "model.args": {"width": 24},
                                "objective": "mynets.losses:Smoothed", "transform": None, "metrics": None})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = mpirun(2, mpidl_cmd("train", str(job)), cwd=elsewhere, timeout=300)
    assert r.returncode == 0, r.output[-3000:]
    r = run(mpidl_cmd("quantize", str(user / "run"), "--json"), cwd=elsewhere, timeout=300)
    assert r.returncode == 0, r.output[-3000:]
    assert "dynamic_int8" in r.stdout or "int8" in r.stdout


BAD_CODE = [  # (override, the one line's text)
    ("model.name=mynets.nowhere:Net", "model.name: mynets.nowhere:Net: no module named 'mynets.nowhere' (looked in "),
    ("model.name=mynets.models:Nope", "model.name: mynets.models:Nope: mynets.models has no attribute 'Nope'"),
    ("model.name=mynets.models:not_a_module", "model.name: mynets.models:not_a_module: returned a str, not a "
                                              "torch.nn.Module"),
    ("model.args.depth=3", "model.args: mynets.models:TinyNet: got an unexpected keyword argument 'depth'"),
    ("model.name=mynets.broken:Net", "model.name: mynets.broken:Net: importing mynets.broken raised RuntimeError: "
                                     "this module cannot be imported (broken.py:3)"),
    ("objective.args.alpha=1", "objective.args: mynets.losses:focal: got an unexpected keyword argument 'alpha' "
                               "(it is called as fn(output, target, **args))"),
    ("metrics.top2=mynets.metrics:top3", "metrics.top2.name: mynets.metrics:top3: mynets.metrics has no attribute"),
    ("transform.name=mynets.aug", "transform.name = \"mynets.aug\": not a built-in"),
    ("model.name=resnet", "model.name = \"resnet\": not a built-in (linear, mlp, small_cnn, resnet18, resnet50, "
                          "mobilenet_v2) nor your code as package.module:attr"),
]

def test_bad_user_code_is_one_line_agreed_by_every_rank(tmp_path):
    job = userpkg.make(tmp_path)
    lines = bad_input_lines(2, [["train", str(job), "--set", override] for override, _ in BAD_CODE], cwd=tmp_path)
    for (override, expect), line in zip(BAD_CODE, lines):
        assert expect in line, (override, line)
    assert not (tmp_path / "runs").exists()  # nothing written


def test_bad_user_code_exits_2_on_every_rank_with_one_line(tmp_path):
    job = userpkg.make(tmp_path)
    override, expect = BAD_CODE[4]  # an import that raises: the user's own traceback stays out of the line
    r = mpirun(2, mpidl_cmd("train", str(job), "--set", override), cwd=tmp_path, timeout=120)
    assert r.returncode == 2, r.output[-3000:]
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and expect in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.output
    assert not (tmp_path / "runs").exists()  # nothing written


# ------------------------------------------------------------------ your own loop: mpidl.Run

def synth(folder) -> None:
    r = run(mpidl_cmd("data", "synth", "tabular", "--out", str(folder / "tab.h5"), "--rows", "3000", "--features",
                      "16", "--classes", "4", "--rule", "nonlinear"), cwd=folder)
    assert r.returncode == 0, r.output


def test_the_plain_loop_the_example_came_from_runs(tmp_path):
    userpkg.make(tmp_path)
    synth(tmp_path)
    plain = run([PYTHON, "plain_loop.py", "tab.h5"], cwd=tmp_path, timeout=300)
    assert plain.returncode == 0 and "epoch 4: loss" in plain.stdout, plain.output[-2000:]


# The user's step ends in Run.log: there rank 1 sends itself SIGUSR2 during step `at` (a global the
# script sets; -1: never), as SLURM's warning would come.
SIGNAL_DURING_STEP = """
import os, signal
from mpidl.train import run as run_module

original = run_module.Run.log

def log(self, **values):
    if self.position.global_step == at and self.world.rank == 1:
        os.kill(os.getpid(), signal.SIGUSR2)
    return original(self, **values)

run_module.Run.log = log
"""

# The example's script run as the user runs it, with the signal at step $SIGNAL_AT_STEP.
SIGNAL_AT = "mpidl_signal.py"
SIGNAL_LOOP = SIGNAL_DURING_STEP + """
import sys
import mpidl_loop

at = int(os.environ["SIGNAL_AT_STEP"])
mpidl_loop.main(sys.argv[1])
"""

# The example's loop on every backend, in turn, by the same 2 ranks: a launch per round (the whole
# runs, the preempted ones, the resumes), each resume reading what another process wrote. The loop
# is the script's own `main`, run in its folder with its backend; a preemption's SystemExit is kept
# as the exit status it would be. test_the_example_loop_resumes_on_another_world_size checks the
# status of a whole process.
LOOPS_IN_TURN = SIGNAL_DURING_STEP + """
import json, sys
import mpidl
from mpidl import preemption

codes = []
for folder, backend, at in json.loads(sys.argv[1]):
    os.chdir(folder)
    os.environ["MPIDL_BACKEND"] = backend
    sys.path.insert(0, folder)
    import mpidl_loop
    preemption.reset()  # as a fresh process: the signal the run before received stays its own
    try:
        mpidl_loop.main("tab.h5")
        codes.append(0)
    except SystemExit as e:
        codes.append(e.code)
    if mpidl.init().rank == 0:  # rank 0's stderr, a run at a time
        print(f"END OF {folder}", file=sys.stderr, flush=True)
w = mpidl.init()
every = w.comm.gather(codes, root=0)  # one line: ranks' lines can interleave
if w.rank == 0:
    print("RESULT " + json.dumps(every), flush=True)
"""


@pytest.fixture(scope="module")
def example_loops(tmp_path_factory) -> dict:
    """backend -> (its folder, and of its preempted run: the exit status, rank 0's stderr, what it left)."""
    data = tmp_path_factory.mktemp("example-data")
    synth(data)
    folders = {}
    for backend in BACKENDS:
        folders[backend] = tmp_path_factory.mktemp(f"example-{backend}")
        for name in ("full", "part"):
            (folders[backend] / name).mkdir()
            userpkg.make(folders[backend] / name)
            (folders[backend] / name / "tab.h5").write_bytes((data / "tab.h5").read_bytes())

    def round_(name: str, at: int) -> tuple[list, list[str]]:
        r = mpirun(2, pycode(LOOPS_IN_TURN) + [json.dumps([[str(folders[b] / name), b, at] for b in BACKENDS])],
                   timeout=300)
        assert r.returncode == 0, r.output[-3000:]
        (every,) = results(r)
        assert all(codes == every[0] for codes in every), every  # every rank's exit status the same
        return every[0], r.stderr.split("END OF ")

    assert round_("full", -1)[0] == [0] * len(BACKENDS)
    # a signal on rank 1 during step 31 (30 done before it)
    codes, stderrs = round_("part", 30)
    left = [{"summary": json.loads((folders[b] / "part" / "runs" / "example" / "summary.json").read_text()),
             "checkpoints": [p.name for p in (folders[b] / "part" / "runs" / "example" / "checkpoints").iterdir()]}
            for b in BACKENDS]
    assert round_("part", -1)[0] == [0] * len(BACKENDS)
    return {b: (folders[b], codes[i], stderrs[i], left[i]) for i, b in enumerate(BACKENDS)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_example_loop_on_every_backend_preempted_resumes_bit_for_bit(example_loops, backend):
    """The example's loop (mpidl_loop.py): a whole run, then one preempted and resumed, ending with
    the same weights."""
    folder, preempted_code, preempted_stderr, preempted_left = example_loops[backend]
    full = folder / "full" / "runs" / "example"
    summary = json.loads((full / "summary.json").read_text())
    steps = 3000 // (2 * 64)
    assert summary["global_step"] == 5 * steps and summary["backend"] == backend and summary["preempted"] is None
    recs = records(full)
    assert recs[-1]["loss"] < recs[0]["loss"] and set(recs[0]["time"]) == {"data", "compute", "sync", "optimizer"}
    assert recs[0]["samples_per_s"] > 0 and recs[0]["lr"] == pytest.approx(0.1)
    if backend != "ddp":  # ddp's allreduce runs inside backward: its sync bucket is empty
        assert sum(r_["time"]["sync"] for r_ in recs) > 0
    assert not (full / "mpidl.lock").exists()
    # the signal during step 31: both ranks stopped after step 32 (the agreement is read one step
    # late), with a checkpoint, and exit 3
    assert preempted_code == 3, preempted_stderr[-3000:]
    assert preempted_stderr.count("preempted by SIGUSR2 at step 32 (checkpoint written); not requeued") == 1
    assert preempted_left["summary"]["preempted"] == "SIGUSR2"
    assert "ckpt-000000032.pt" in preempted_left["checkpoints"]
    part = folder / "part" / "runs" / "example"
    # then resumed to the end
    s = json.loads((part / "summary.json").read_text())
    assert s["resumed_from"].endswith("ckpt-000000032.pt") and s["global_step"] == 5 * (3000 // 128)
    a, b = final_weights(full / "checkpoints"), final_weights(part / "checkpoints")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_the_example_loop_resumes_on_another_world_size(tmp_path):
    userpkg.make(tmp_path)
    (tmp_path / SIGNAL_AT).write_text(SIGNAL_LOOP)
    synth(tmp_path)
    r = mpirun(2, [PYTHON, SIGNAL_AT, "tab.h5"], cwd=tmp_path, env={"MPIDL_BACKEND": "mpi", "SIGNAL_AT_STEP": "10"})
    assert r.returncode == 3, r.output[-3000:]
    r = mpirun(3, [PYTHON, SIGNAL_AT, "tab.h5"], cwd=tmp_path, env={"MPIDL_BACKEND": "mpi", "SIGNAL_AT_STEP": "-1"})
    assert r.returncode == 0, r.output[-3000:]
    assert "resuming a 2-rank checkpoint on 3 ranks" in r.output
    s = json.loads((tmp_path / "runs" / "example" / "summary.json").read_text())
    assert s["world"]["size"] == 3 and s["global_step"] == 5 * (3000 // (3 * 64))


@pytest.mark.mpi  # its child starts mpirun
def test_a_two_size_study_of_your_own_loop(tmp_path):
    """`mpidl scale` with `command:`: the points' backend, folder and length reach the script's
    mpidl.Run through the environment; the figures come from the records the Run writes."""
    userpkg.make(tmp_path)
    synth(tmp_path)
    study = {"name": "loop", "command": ["python", "mpidl_loop.py", "tab.h5"], "mode": "weak", "sizes": [1, 2],
             "batch_per_rank": 64, "warmup_steps": 10, "steps": 20, "window": 10, "repetitions": 1,
             "backends": ["mpi"], "baseline": True, "output": str(tmp_path / "study")}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    r = run(mpidl_cmd("scale", "study.yaml"), cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.output[-3000:]
    doc = json.loads((tmp_path / "study" / "study.json").read_text())
    assert doc["complete"] and doc["failed_runs"] == 0 and doc["job"] == {"command": study["command"]}
    assert {(p["backend"], p["size"]) for p in doc["points"]} == {("mpi", 1), ("mpi", 2), ("none", 1), ("none", 2)}
    assert doc["model_inputs"]["grad_params"] == sum(16 * 64 + 64 + 64 * 64 + 64 + 64 * 4 + 4 for _ in [0])
    for row in doc["runs"]:
        summary = json.loads((tmp_path / "study" / row["run_dir"] / "summary.json").read_text())
        assert summary["backend"] == row["backend"] and summary["world"]["size"] == row["size"]
        assert summary["global_step"] == 30 and row["throughput"] > 0
    assert not (tmp_path / "runs" / "example").exists()  # the script's own folder stayed untouched
    r = run(mpidl_cmd("report", str(tmp_path / "study")), cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.output[-3000:]
    assert "mpidl_loop.py" in (tmp_path / "study" / "report.md").read_text()


def test_a_sweep_of_a_user_job(tmp_path):
    """`mpidl sweep` over a job that names the user's code: each task imports it from the base job's folder."""
    userpkg.make(tmp_path, epochs=1, **{"data.files": str(tmp_path / "tab.h5")})
    sweep = {"name": "s", "job": "job.yaml", "grid": {"optimizer.lr": [0.05, 0.1]}, "metric": "val_top2",
             "mode": "max", "output": str(tmp_path / "sweep")}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = mpirun(2, mpidl_cmd("sweep", str(tmp_path / "sweep.yaml")), cwd=elsewhere, timeout=300)
    assert r.returncode == 0, r.output[-3000:]
    rows = json.loads((tmp_path / "sweep" / "results.json").read_text())["tasks"]
    assert len(rows) == 2 and all(row["status"] == "ok" and row["val_top2"] > 0.5 for row in rows), rows
