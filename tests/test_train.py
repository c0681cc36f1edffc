"""Training under real mpirun: the demo, backends agreeing, identical ranks, bad specs, faults.

Checkpoints and resume are in test_checkpoint.py."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, cli_in_turn, has_horovod, mpidl_cmd, mpirun, needs_cuda, pycode, run

BACKENDS = ["horovod", "ddp", "mpi"] if has_horovod() else ["ddp", "mpi"]


def write_job(tmp: Path, **over) -> Path:
    """A small tabular classification job (MLP, no BatchNorm) writing under `tmp`."""
    job = {
        "name": "t", "seed": 3, "epochs": 2, "backend": "mpi",
        "data": {"files": str(tmp / "tab.h5"), "batch": 16, "val_fraction": 0.1,
                 "synth": {"kind": "tabular", "rows": 2000, "features": 8, "classes": 3, "rule": "nonlinear"}},
        "model": {"name": "mlp", "args": {"hidden": [32], "num_classes": 3}},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4},
        "schedule": {"kind": "cosine", "warmup_epochs": 0.2},
        "checkpoint": {"every_epochs": 1},
        "output": str(tmp / "run"), "log_every": 1,
    }
    for key, value in over.items():
        node = job
        *path, last = key.split("__")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    path = tmp / f"job-{len(list(tmp.glob('job-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def losses(run_dir: Path) -> list[float]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r]


def final_weights(ckpt_dir: Path) -> dict:
    last = sorted(ckpt_dir.glob("ckpt-*.pt"))[-1]
    return torch.load(last, map_location="cpu", weights_only=True)["model"]


def test_demo_job_reaches_its_accuracy(tmp_path):
    r = mpirun(2, mpidl_cmd("train", str(ROOT / "jobs" / "demo.yaml"), "--require-target",
                            "--set", f"data.files={tmp_path}/demo.h5", "--set", f"output={tmp_path}/run"),
               timeout=600)
    assert r.returncode == 0, r.output[-3000:]
    # under mpirun (whose ranks get a pty) progress is plain lines, one per log interval
    progress = [line for line in r.stdout.splitlines() if "samples/s" in line]
    assert "\r" not in r.stdout and "\033[K" not in r.stdout
    assert 6 <= len(progress) <= 1008 // 25 + 2 * 6  # log_every 25, plus epoch ends
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["reached_target"] is True and summary["final"]["val_accuracy"] >= 0.8
    assert summary["world"]["size"] == 2
    assert summary["backend"] == ("horovod" if has_horovod() else summary["backend"])
    assert set(summary["step_time_breakdown_s"]) == {"data", "compute", "sync", "optimizer"}
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line)["step"] > 0 for line in lines)


SAME_PARAMS = """
import sys, hashlib, mpidl
from mpidl.spec import load_spec
from mpidl.train.callbacks import Callback
from mpidl.train.trainer import train

class Capture(Callback):
    def on_end(self, trainer, summary):
        self.net = trainer.net

w = mpidl.init()
for job in sys.argv[1:]:
    cap = Capture()
    train(load_spec(job), callbacks=[cap])
    h = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in cap.net.parameters())).hexdigest()
    hs = w.comm.gather(h, root=0)
    if w.rank == 0:
        print("HASHES", " ".join(hs), flush=True)
"""


def test_three_backends_agree_and_every_rank_ends_with_the_same_parameters(tmp_path):
    """Every backend in turn, by one launch of 3 ranks (an odd count, so the reductions' order
    differs from 2's) with gradient accumulation; the ranks' final parameters are bit for bit the
    same within a backend, and the backends' loss curves and final weights agree."""
    jobs = [write_job(tmp_path, backend=b, output=str(tmp_path / f"run-{b}"), epochs=1, accumulate=2)
            for b in BACKENDS]
    r = mpirun(3, pycode(SAME_PARAMS) + [str(job) for job in jobs], timeout=300)
    assert r.returncode == 0, r.output[-3000:]
    per_backend = [line.split()[1:] for line in r.stdout.splitlines() if line.startswith("HASHES")]
    assert len(per_backend) == len(BACKENDS), r.output[-3000:]
    curves = {}
    for b, hashes in zip(BACKENDS, per_backend):
        assert len(hashes) == 3 and len(set(hashes)) == 1, (b, hashes)
        curves[b] = losses(tmp_path / f"run-{b}")
    ref = curves["mpi"]
    assert len(ref) >= 18  # 1800 rows / (3 ranks × 16) = 37 batches, 18 steps of 2
    for b, c in curves.items():
        assert len(c) == len(ref)
        for a, e in zip(c, ref):
            assert abs(a - e) <= 1e-4 * max(1.0, abs(e)), (b, a, e)
    w = {b: final_weights(tmp_path / f"run-{b}" / "checkpoints") for b in BACKENDS}
    for b in BACKENDS:
        for k in w["mpi"]:
            torch.testing.assert_close(w[b][k], w["mpi"][k], rtol=1e-4, atol=1e-5)


BAD_SPECS = [
    (["--set", "optimizer.lr=-1"], "optimizer.lr = -1: Input should be greater than 0"),
    (["--set", "schedule.warmup_epochs=.inf"], "schedule.warmup_epochs = .inf: Input should be a finite number"),
    (["--set", "name=../../x"], 'name = "../../x": a name is one folder name'),
    (["--set", 'output="{nme}"'], 'output = "{nme}": the only placeholder is {name}'),
    (["--set", "model.args.depth=3"], "model.args: mlp takes no argument 'depth'"),
    (["--set", "data.files=nowhere.h5", "--set", "data.synth=null"], "nowhere.h5: file not found"),
    (["--set", "data.batch=5000"], "fewer than ranks × batch"),
    (["--resume"], "no checkpoint (ckpt-*.pt) is there"),
    (["--set", "model.args.num_classes=ten"], "model.args.num_classes = 'ten': a class count must be a positive"),
]


def refused(job: Path, *args: str) -> str:
    """What `mpidl train JOB ARGS` refuses with, run in this process: the BadInput of `run_job`, the
    function the command calls (its exit status and one line under mpirun: the tests below that
    launch)."""
    from mpidl.cli import build_parser
    from mpidl.errors import BadInput
    from mpidl.spec import load_spec
    from mpidl.train.job import run_job

    a = build_parser().parse_args(["train", str(job), *args])
    with pytest.raises(BadInput) as e:
        run_job(lambda: load_spec(a.job, a.set), resume=a.resume, overwrite=a.overwrite)
    message = str(e.value)
    assert "\n" not in message, message  # one line
    return message


@pytest.mark.parametrize("setting,expect", BAD_SPECS)
def test_bad_spec_is_refused_with_one_line(tmp_path, setting, expect):
    """Each bad setting's one line (spec checks alone are in test_spec.py); under 2 ranks: next test."""
    assert expect in refused(write_job(tmp_path), *setting)


def test_bad_spec_exits_2_with_one_line(tmp_path):
    """Under 2 ranks: one line in all, exit 2, no traceback (the exit-status test of `train`)."""
    setting, expect = BAD_SPECS[0]
    r = mpirun(2, mpidl_cmd("train", str(write_job(tmp_path)), *setting), timeout=120)
    assert r.returncode == 2, r.output[-3000:]
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert expect in errors[0], errors[0]


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_a_typo_is_refused_before_torch_is_imported(tmp_path, command):
    """A spec (or sweep file) with a typo fails in a fraction of a second: torch's import, seconds
    of CPU, comes after the file is read (Python's own import log says what was imported)."""
    (tmp_path / "typo.yaml").write_text("name: t\nepocs: 2\n")
    r = run([sys.executable, "-X", "importtime", "-m", "mpidl.cli", command, str(tmp_path / "typo.yaml")])
    assert r.returncode == 2, r.output[-3000:]
    assert "unknown key 'epocs'" in r.stderr, r.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "mpidl.spec" in imported and "torch" not in imported


def test_missing_or_broken_spec_file(tmp_path):
    assert "job spec not found" in refused(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    assert "not valid YAML at line" in refused(tmp_path / "bad.yaml")


FAULT = """
import sys, mpidl
from mpidl.spec import load_spec
from mpidl.train.callbacks import Callback
from mpidl.train.trainer import train

w = mpidl.init()

class Fault(Callback):
    def on_start(self, trainer):
        calls = [0]
        def hook(module, args):
            calls[0] += 1
            if w.rank == 1 and calls[0] == 7:
                raise RuntimeError("injected fault in rank 1 at step 7")
        trainer.net.register_forward_pre_hook(hook)

train(load_spec(sys.argv[1]), callbacks=[Fault()])
print("finished", w.rank, flush=True)
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_failure_mid_training_ends_job(tmp_path, backend):
    job = write_job(tmp_path, backend=backend)
    r = mpirun(2, pycode(FAULT) + [str(job)], timeout=120)  # a hang would hit the timeout
    assert r.returncode != 0
    assert "[rank 1] RuntimeError: injected fault in rank 1 at step 7" in r.stderr
    assert "finished" not in r.stdout


NO_HOROVOD = """
import sys
sys.modules["horovod"] = None          # as on a machine without Horovod
sys.modules["horovod.torch"] = None
from mpidl.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_mpi_backend_needs_no_horovod(tmp_path, monkeypatch):
    job = write_job(tmp_path, epochs=1)
    r = mpirun(2, pycode(NO_HOROVOD) + ["train", str(job), "--set", "backend=mpi"], timeout=300)
    assert r.returncode == 0, r.output[-3000:]
    monkeypatch.setitem(sys.modules, "horovod", None)          # as NO_HOROVOD does
    monkeypatch.setitem(sys.modules, "horovod.torch", None)
    # and mpidl's backend module not imported yet, as in a fresh process (an earlier test of this
    # worker may have imported it)
    monkeypatch.delitem(sys.modules, "mpidl.train.backends.horovod", raising=False)
    assert "horovod is not importable" in refused(job, "--set", "backend=horovod", "--overwrite")


def image_job(tmp: Path, **over) -> Path:
    """A small CNN on synthetic 16×16 images, bf16 autocast and channels_last: the GPU job's path."""
    return write_job(tmp, precision="bf16", epochs=3, data__files=str(tmp / "img.h5"),
                     data__synth={"kind": "images", "rows": 4000, "classes": 4, "channels": 3, "size": 16, "noise": 120},
                     data__preprocess={"scale_uint8": True, "flip": True}, data__batch=32,
                     model={"name": "small_cnn", "args": {"width": 16}, "channels_last": True}, **over)


@pytest.fixture(scope="module")
def bf16_runs(tmp_path_factory) -> dict:
    """backend -> its folder: the bf16 job of each backend run in turn by one process, no launcher."""
    folders = {b: tmp_path_factory.mktemp(f"bf16-{b}") for b in BACKENDS}
    cli_in_turn(1, [["train", str(image_job(folder, backend=b))] for b, folder in folders.items()])
    return folders


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_autocast_channels_last_on_cpu(bf16_runs, backend):
    summary = json.loads((bf16_runs[backend] / "run" / "summary.json").read_text())
    assert summary["backend"] == backend
    assert summary["precision"] == "bf16" and summary["world"]["device"] == "cpu"
    assert summary["final"]["val_accuracy"] > 0.6  # 4 classes: chance is 0.25


@needs_cuda
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_bf16_single_rank(tmp_path, backend):
    r = run(mpidl_cmd("train", str(image_job(tmp_path, backend=backend))), timeout=300)
    assert r.returncode == 0, r.output[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world"]["device"].startswith("cuda") and summary["backend"] == backend
    assert summary["final"]["val_accuracy"] > 0.6


def test_steps_limited_job_evaluates_at_its_end(tmp_path):
    job = write_job(tmp_path, epochs=None, steps=30, log_every=10)
    r = run(mpidl_cmd("train", str(job)), timeout=120)  # one process, no launcher
    assert r.returncode == 0, r.output[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["global_step"] == 30 and summary["world"]["launcher"] == "single"
    assert 0 < summary["final"]["val_loss"] and 0 <= summary["final"]["val_accuracy"] <= 1
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r_["step"] for r_ in recs if "loss" in r_] == [10, 20, 30]
    for r_ in recs[:3]:  # each window's step time, split into its buckets
        assert set(r_["time"]) == {"data", "compute", "sync", "optimizer"}
        assert 0 < sum(r_["time"].values()) <= r_["step_time"] * (1 + 1e-9)
    assert recs[-1]["step"] == 30 and "val_loss" in recs[-1]


def _tabular_with_nan(path: Path, row: int) -> None:
    import h5py
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    x[row, 3] = np.nan
    with h5py.File(path, "w") as f:
        f["x"], f["y"] = x, y


def test_non_finite_loss_stops_the_job_and_keeps_the_last_good_checkpoint(tmp_path):
    _tabular_with_nan(tmp_path / "nan.h5", row=1234)
    job = write_job(tmp_path, data__files=str(tmp_path / "nan.h5"), data__synth=None,
                    model={"name": "mlp", "args": {"hidden": [16], "num_classes": 2}},
                    checkpoint={"every_steps": 5})
    r = mpirun(2, mpidl_cmd("train", str(job)), timeout=180)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.output[-3000:]
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, r.stderr
    m = re.search(r"\[rank (\d)\] error: non-finite loss \(nan\) at step (\d+) on rank \1; "
                  r"the input batch holds 1 non-finite value$", errors[0])
    assert m, errors[0]
    step = int(m.group(2))
    assert "done:" not in r.stdout and not (tmp_path / "run" / "summary.json").exists()
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("ckpt-*.pt"))
    assert ckpts, "a checkpoint every 5 steps: the good steps before the bad row are on disk"
    for c in ckpts:
        assert int(c.stem.split("-")[1]) < step
        weights = torch.load(c, map_location="cpu", weights_only=True)["model"]
        assert all(torch.isfinite(t).all() for t in weights.values())


@pytest.mark.parametrize("lagged", [False, True])
def test_non_finite_targets_are_the_data_not_a_diverged_model(lagged):
    from mpidl.errors import Diverged
    from mpidl.train.finite import FiniteLoss

    nan, x, y = torch.tensor(float("nan")), torch.zeros(4, 3), torch.tensor([[1.0], [float("nan")], [2.0], [-1.0]])
    data = "the data holds NaN or Inf, not the model"
    for batch, expect in [((x, y), f"the target batch holds 1 non-finite value: {data}"),
                          ((x.log(), y), f"the target batch holds 1 non-finite value (and the input batch 12): {data}"),
                          ((x.log(), y.nan_to_num()), "the input batch holds 12 non-finite values"),
                          ((x, y.nan_to_num()), "the batch is finite: the model diverged (try a lower lr, or gradient "
                                                "clipping)")]:
        finite = FiniteLoss(rank=1, lagged=lagged)
        with pytest.raises(Diverged) as e:
            finite.watch(6, nan, *batch)
            finite.check()  # lagged: the flag of a batch is read at the next batch or a checkpoint
        assert str(e.value) == f"non-finite loss (nan) at step 7 on rank 1; {expect}"


@pytest.mark.parametrize("row", [1234, 1900])  # a training row, a held-out row (the last 10%)
def test_non_finite_regression_targets_stop_every_rank_before_training(tmp_path, row):
    """Named as the data's (file, dataset, row), with exit 2, before the first step: not the
    "model diverged" of a NaN loss mid-run."""
    import h5py
    import numpy as np

    data = tmp_path / "reg.h5"
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 8)).astype(np.float32)
    y = x[:, :1] * 2 + 1
    y[row, 0] = np.nan
    with h5py.File(data, "w") as f:
        f["x"], f["y"] = x, y
    job = write_job(tmp_path, data__files=str(data), data__synth=None, model={"name": "linear"})
    message = refused(job)
    assert message == f"{data}: dataset 'y' row {row} holds nan: the data holds 1 non-finite target", message
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_fresh_run_into_an_old_runs_folder_is_refused(tmp_path):
    job = write_job(tmp_path, epochs=None, steps=6)
    assert run(mpidl_cmd("train", str(job)), timeout=120).returncode == 0
    assert "already holds a run's checkpoints (ckpt-000000006.pt): add --resume" in refused(job)
    assert not (tmp_path / "run" / "mpidl.lock").exists()  # refused in this process: the folder is free again
    r = mpirun(2, mpidl_cmd("train", str(job), "--overwrite", "--set", "steps=4"), timeout=120)
    assert r.returncode == 0, r.output[-2000:]
    assert [p.name for p in (tmp_path / "run" / "checkpoints").glob("ckpt-*.pt")] == ["ckpt-000000004.pt"]


def _tabular(path: Path, labels, rows: int = 2000, features: int = 8) -> None:
    """Float rows whose label is learnable; `labels(y)` may then plant bad values."""
    import h5py
    import numpy as np

    rng = np.random.default_rng(1)
    x = rng.standard_normal((rows, features)).astype(np.float32)
    y = labels((x[:, 0] > 0).astype(np.int64) + 2 * (x[:, 1] > 0))
    with h5py.File(path, "w") as f:
        f["x"], f["y"] = x, y


def _planted(at: dict):
    def plant(y):
        for row, value in at.items():
            y[row] = value
        return y
    return plant


@pytest.mark.parametrize("classes,planted,row,value,count,lo,hi", [
    (10, {1500: 11, 1700: 12}, 1500, 11, 2, 0, 12),   # the spec's count, a bad training row
    (4, {1900: 4}, 1900, 4, 1, 0, 4),                 # only in the held-out split (its rows 1800..)
    (None, {1600: -1}, 1600, -1, 1, -1, 3),           # inferred count: a negative label
])
def test_labels_outside_the_classes_stop_every_rank_before_training(tmp_path, classes, planted, row, value,
                                                                    count, lo, hi):
    data = tmp_path / "labels.h5"
    _tabular(data, _planted(planted))
    args = {"hidden": [16], **({"num_classes": classes} if classes else {})}
    job = write_job(tmp_path, data__files=str(data), data__synth=None, model={"name": "mlp", "args": args})
    message = refused(job)
    n = classes or hi + 1
    assert message == (f"{data}: dataset 'y' row {row} holds label {value}, outside [0, {n}) for "
                       f"{n} classes ({count} such labels; they range {lo}..{hi})"), message
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # stopped before the first step


@pytest.mark.parametrize("val,expect", [
    (lambda x, y: (x[:, :7], y), "dataset 'x' rows are (7,) float32, but in the training files ({train}) (8,) float32"),
    (lambda x, y: (x.astype("float64"), y), "dataset 'x' rows are (8,) float64, but in the training files"),
    (lambda x, y: ((x * 10).astype("uint8"), y), "dataset 'x' rows are (8,) uint8, but in the training files"),
    (lambda x, y: (x, y.astype("int32")), "dataset 'y' rows are scalars int32, but in the training files ({train}) "
                                          "scalars int64"),
    (lambda x, y: (x, y), None),  # the same kind of rows
])
def test_held_out_rows_of_another_shape_or_dtype_are_refused(tmp_path, val, expect):
    """The model takes one kind of row: another one failed in the first evaluation, mid-run."""
    import h5py

    import mpidl
    from mpidl.errors import BadInput
    from mpidl.spec import load_spec
    from mpidl.train.inputs import sources

    train, held = tmp_path / "train.h5", tmp_path / "val.h5"
    _tabular(train, lambda y: y)
    with h5py.File(train) as f:
        x, y = val(f["x"][:200], f["y"][:200])
    with h5py.File(held, "w") as f:
        f["x"], f["y"] = x, y
    spec = load_spec(write_job(tmp_path, data__files=str(train), data__val_files=str(held), data__synth=None))
    if expect is None:
        assert len(sources(spec, mpidl.init())[1]) == 200
        return
    with pytest.raises(BadInput) as e:
        sources(spec, mpidl.init())
    assert str(e.value).startswith(f"data.val_files: {held}: " + expect.format(train=train)), str(e.value)


def test_an_output_that_is_a_file_stops_every_rank_before_training(tmp_path):
    (tmp_path / "run").write_text("not a folder")
    message = refused(write_job(tmp_path))
    assert message == f'output = "{tmp_path}/run": {tmp_path}/run is a file, not a folder', message
    assert not (tmp_path / "tab.h5").exists()  # before anything: not even the synthetic data


def test_held_out_rows_of_another_shape_stop_every_rank_before_training(tmp_path):
    train, held = tmp_path / "train.h5", tmp_path / "val.h5"
    _tabular(train, lambda y: y)
    _tabular(held, lambda y: y, rows=200, features=9)
    job = write_job(tmp_path, data__files=str(train), data__val_files=str(held), data__synth=None)
    message = refused(job)
    assert message == (f"data.val_files: {held}: dataset 'x' rows are (9,) float32, but in the training "
                       f"files ({train}) (8,) float32"), message
    assert not (tmp_path / "run").exists()  # stopped before the run folder was made


@pytest.fixture(scope="module")
def label_runs(tmp_path_factory) -> dict:
    """The two runs below, each in its folder, in turn by one launch of 2 ranks: "five" infers
    its class count from labels 0..3 and one 4; "eval" holds out 201 rows of 4 classes."""
    five, held = tmp_path_factory.mktemp("five"), tmp_path_factory.mktemp("eval")
    _tabular(five / "five.h5", _planted({7: 4}))  # labels 0..3, and one 4
    _tabular(held / "eval.h5", lambda y: y, rows=2010)
    jobs = [write_job(five, data__files=str(five / "five.h5"), data__synth=None, epochs=1,
                      model={"name": "mlp", "args": {"hidden": [16]}}),
            write_job(held, data__files=str(held / "eval.h5"), data__synth=None, epochs=1,
                      model={"name": "mlp", "args": {"hidden": [16], "num_classes": 4}})]
    cli_in_turn(2, [["train", str(job)] for job in jobs], timeout=300)
    return {"five": five, "eval": held}


def test_class_count_inferred_from_the_labels(label_runs):
    tmp_path = label_runs["five"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["classes"] == 5
    last = sorted((tmp_path / "run" / "checkpoints").glob("ckpt-*.pt"))[-1]
    state = torch.load(last, map_location="cpu", weights_only=True)
    head = [v for k, v in state["model"].items() if k.endswith("weight")][-1]
    assert head.shape == (5, 16)
    assert state["spec"]["model"]["args"]["num_classes"] == 5  # the run rebuilds its model from it


def test_evaluation_sees_every_held_out_row_once(label_runs):
    """201 held-out rows on 2 ranks, batch 16 (shares 100 and 101: neither a multiple of the
    batch): all 201 evaluated once, the same accuracy and loss as one process over those rows."""
    import h5py

    from mpidl.data import H5Source
    from mpidl.train.runs import build_model, load_run

    tmp_path = label_runs["eval"]
    data = tmp_path / "eval.h5"
    final = json.loads((tmp_path / "run" / "summary.json").read_text())["final"]
    assert final["val_samples"] == 201
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [rec["val_samples"] for rec in recs if "val_loss" in rec] == [201]

    # One process, one batch, the final checkpoint (written at the step evaluated) on the same rows.
    model = build_model(load_run(str(tmp_path / "run"), "test"), H5Source(str(data)), "test")
    with h5py.File(data, "r") as f:
        x, y = torch.from_numpy(f["x"][2010 - 201:]), torch.from_numpy(f["y"][2010 - 201:])
    with torch.no_grad():
        out = model(x)
    correct = int((out.argmax(1) == y).sum())
    assert correct > 0
    assert round(final["val_accuracy"] * 201) == correct and abs(final["val_accuracy"] - correct / 201) < 1e-9
    loss = float(torch.nn.functional.cross_entropy(out, y))
    assert abs(final["val_loss"] - loss) <= 1e-5 * loss, (final["val_loss"], loss)
