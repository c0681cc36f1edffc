"""Checkpoints: atomic files, clear errors, and resume that continues exactly (real mpirun)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import bad_input_lines, cli_in_turn
from mpidl.errors import BadInput
from mpidl.train import checkpoint
from test_train import BACKENDS, final_weights, write_job


# ------------------------------------------------------------------ the file format, one process
def test_save_is_atomic_and_keeps_the_newest(tmp_path):
    for step in (5, 10, 15):
        checkpoint.save(tmp_path, step, {"model": {"w": torch.full((3,), float(step))}, "fingerprint": "f"}, keep=2)
    names = [p.name for p in checkpoint.all_checkpoints(tmp_path)]
    assert names == ["ckpt-000000010.pt", "ckpt-000000015.pt"]
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    assert checkpoint.latest(tmp_path).name == "ckpt-000000015.pt"
    assert torch.equal(checkpoint.load(checkpoint.latest(tmp_path), "f")["model"]["w"], torch.full((3,), 15.0))
    assert checkpoint.latest(tmp_path / "none") is None


def test_a_failed_write_leaves_no_file(tmp_path):
    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        checkpoint.save(tmp_path, 1, {"model": {}, "fingerprint": "f", "bad": Unpicklable()}, keep=2)
    assert checkpoint.latest(tmp_path) is None


def test_load_errors_name_the_file(tmp_path):
    good = checkpoint.save(tmp_path, 1, {"model": {}, "fingerprint": "aaa"}, keep=5)
    with pytest.raises(BadInput, match="written by a different job .*fingerprint aaa, this job bbb"):
        checkpoint.load(good, "bbb")
    torn = tmp_path / "ckpt-000000002.pt"
    torn.write_bytes(good.read_bytes()[: os.path.getsize(good) // 2])
    with pytest.raises(BadInput, match=f"^{torn}: corrupt checkpoint"):
        checkpoint.load(torn, "aaa")
    other = tmp_path / "ckpt-000000003.pt"
    torch.save([1, 2, 3], other)
    with pytest.raises(BadInput, match="not an mpidl checkpoint"):
        checkpoint.load(other, "aaa")


class _Planted:
    """What an attacker leaves in a shared run folder: a pickle that runs a command when loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_pickle_is_refused_not_run(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    planted = tmp_path / "ckpt-000000001.pt"
    torch.save({"model": {}, "fingerprint": "f", "x": _Planted(marker)}, planted)
    monkeypatch.delenv(checkpoint.TRUST_ENV, raising=False)
    with pytest.raises(BadInput, match=r"holds a pickled object \((posix|os)\.system\) .* MPIDL_TRUST_CHECKPOINTS=1"):
        checkpoint.load(planted, "f")
    assert not marker.exists()
    # every door that reads checkpoints goes through load: resume, a teacher, quantize
    from mpidl.train.runs import load_run

    with pytest.raises(BadInput, match=r"^distill.teacher: .*holds a pickled object"):
        load_run(str(tmp_path), "distill.teacher")
    assert not marker.exists()


def test_checkpoints_hold_only_plain_values_and_rng_comes_back(tmp_path):
    import random

    import numpy as np

    from mpidl.train import rng

    np.random.seed(7), random.seed(7), torch.manual_seed(7)
    before = rng.capture()
    expect = (np.random.rand(3), random.random(), torch.rand(3))
    path = checkpoint.save(tmp_path, 1, {"model": {}, "fingerprint": "f", "rng": before}, keep=1)
    state = torch.load(path, weights_only=True)  # no pickled object anywhere
    assert state["format"] == checkpoint.FORMAT
    rng.restore(checkpoint.load(path, "f")["rng"])
    again = (np.random.rand(3), random.random(), torch.rand(3))
    assert np.array_equal(expect[0], again[0]) and expect[1] == again[1] and torch.equal(expect[2], again[2])


def test_a_trusted_checkpoint_of_the_old_format_loads(tmp_path, monkeypatch):
    import numpy as np

    old = tmp_path / "ckpt-000000001.pt"
    np.random.seed(3)
    torch.save({"model": {"w": torch.ones(2)}, "fingerprint": "f",
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": (3, (1,) * 625, None)}},
               old)
    monkeypatch.delenv(checkpoint.TRUST_ENV, raising=False)
    with pytest.raises(BadInput, match=r"pickled object \(numpy"):
        checkpoint.load(old, "f")
    monkeypatch.setenv(checkpoint.TRUST_ENV, "1")
    state = checkpoint.load(old, "f")
    assert torch.equal(state["rng"]["numpy"]["keys"], torch.from_numpy(np.random.get_state()[1].astype("int64")))


def test_a_torn_newest_checkpoint_falls_back_to_the_one_before(tmp_path):
    for step in (10, 20):
        checkpoint.save(tmp_path, step, {"model": {"w": torch.full((2,), float(step))}, "fingerprint": "f"}, keep=2)
    newest = checkpoint.path_for(tmp_path, 20)
    newest.write_bytes(newest.read_bytes()[:100])
    path, state = checkpoint.load_newest(tmp_path, "f")
    assert path.name == "ckpt-000000010.pt" and state["model"]["w"][0] == 10
    checkpoint.path_for(tmp_path, 10).write_bytes(b"")
    with pytest.raises(BadInput, match="ckpt-000000020.pt: corrupt checkpoint"):
        checkpoint.load_newest(tmp_path, "f")
    with pytest.raises(BadInput, match="written by a different job"):  # never skipped: it is not damage
        checkpoint.save(tmp_path, 30, {"model": {}, "fingerprint": "g"}, keep=3)
        checkpoint.load_newest(tmp_path, "f")


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs: a real full disk (root only)."""
    import subprocess

    where = tmp_path / "disk"
    where.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)],
                                           capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield where
    subprocess.run(["umount", str(where)], capture_output=True)


def test_a_full_disk_is_one_line_and_leaves_nothing(small_disk):
    from mpidl.errors import Fault

    with pytest.raises(Fault, match=r"ckpt-000000001.pt: cannot write the checkpoint: disk full"):
        checkpoint.save(small_disk, 1, {"model": {"w": torch.zeros(1 << 17)}, "fingerprint": "f"}, keep=2)
    assert list(small_disk.iterdir()) == []


# ------------------------------------------------------------------ resume under mpirun
def image_job(tmp_path: Path, out: str, **over) -> Path:
    """Small CNN with BatchNorm and random flips on 8×8 images: every kind of state a resume must restore."""
    return write_job(tmp_path, output=str(tmp_path / out), epochs=2, seed=5,
                     data={"files": str(tmp_path / "img.h5"), "batch": 16, "val_fraction": 0.1,
                           "synth": {"kind": "images", "rows": 1600, "classes": 4, "channels": 2, "size": 8,
                                     "noise": 60},
                           "preprocess": {"flip": True}},
                     model={"name": "small_cnn", "args": {"width": 8}},
                     checkpoint={"every_steps": 20, "every_epochs": 1}, **over)


# The runs that only set a test's scene (an uninterrupted reference, the first stop) are `mpidl
# train` runs too, but those of every test here in one launch (`cli_in_turn`, on the same 2 ranks).
# The resumes a test checks run in launches of their own (fixture `resumed`): each reads a checkpoint
# that another process wrote, as a requeued job does.


def mid_epoch_scene(tmp: Path, backend: str):
    # 1440 training rows / (2 ranks × 16) = 45 steps an epoch: step 52 is mid-epoch and between
    # checkpoints. SGD with momentum and weight decay, cosine schedule with warm-up: every piece of
    # optimizer state and every hyperparameter must come back exactly.
    over = dict(accumulate=1, backend=backend, optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9,
                                                          "weight_decay": 5e-4},
                schedule={"kind": "cosine", "warmup_epochs": 0.3})
    full, part = image_job(tmp, "full", **over), image_job(tmp, "part", **over)
    # the reference; and the first preemption, at the epoch boundary (step 45)
    return part, [["train", str(full)], ["train", str(part), "--stop-at", "45"]]


def world_size_scene(tmp: Path, backend: str):
    job = write_job(tmp, backend=backend, checkpoint={"every_steps": 20})
    return job, [["train", str(job), "--stop-at", "40"]]  # on 2 ranks


def corrupt_scene(tmp: Path, backend: str):
    # two runs stopped at step 10: one resumed with another model, one whose checkpoint is torn
    jobs = [write_job(tmp, backend=backend, output=str(tmp / out)) for out in ("mismatched", "torn")]
    return jobs, [["train", str(job), "--stop-at", "10"] for job in jobs]


SCENES = {"test_resume_mid_epoch_is_bit_exact": mid_epoch_scene,
          "test_resume_on_another_world_size": world_size_scene,
          "test_corrupt_and_mismatched_checkpoints": corrupt_scene}


@pytest.fixture(scope="module")
def scenes(request, tmp_path_factory) -> dict:
    """(test, backend) -> (its folder, its job), for the tests selected here, after one launch."""
    made, runs = {}, []
    for item in request.session.items:
        if item.module is request.module and "scene" in item.fixturenames:
            key = (item.originalname, item.callspec.params["backend"])
            folder = tmp_path_factory.mktemp(f"{key[0][5:30]}-{key[1]}")
            job, argvs = SCENES[key[0]](folder, key[1])
            made[key], runs = (folder, job), runs + argvs
    cli_in_turn(2, runs, timeout=280)
    return made


@pytest.fixture
def scene(request, scenes):
    """This test's folder and job, its scene set (see SCENES)."""
    return scenes[request.node.originalname, request.node.callspec.params["backend"]]


@pytest.fixture(scope="module")
def resumed(scenes) -> dict:
    """(test, backend) -> what its resumes left: every selected test's resumes, a launch per round.
    Round one resumes each mid-epoch scene and stops it again at step 52, round two resumes it to
    the end (each round reads what the launch before wrote), and the world-size resumes run on 3."""
    def of(test):
        return {backend: folder_job for (name, backend), folder_job in scenes.items() if name == test}

    left = {}
    mid = of("test_resume_mid_epoch_is_bit_exact")
    if mid:
        cli_in_turn(2, [["train", str(part), "--resume", "--stop-at", "52"] for _, part in mid.values()])
        for backend, (folder, _) in mid.items():
            left["test_resume_mid_epoch_is_bit_exact", backend] = json.loads((folder / "part" / "summary.json").read_text())
        cli_in_turn(2, [["train", str(part), "--resume"] for _, part in mid.values()])
    wide = of("test_resume_on_another_world_size")
    if wide:
        r = cli_in_turn(3, [["train", str(job), "--resume"] for _, job in wide.values()])
        left.update({("test_resume_on_another_world_size", backend): (r.output, len(wide)) for backend in wide})
    return left


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_mid_epoch_is_bit_exact(scene, resumed, backend):
    tmp_path, part = scene  # "full" ran to the end, "part" stopped at step 45 (the epoch boundary)
    # preempted again, mid-epoch (step 52); then resumed to the end
    assert resumed["test_resume_mid_epoch_is_bit_exact", backend]["global_step"] == 52
    summary = json.loads((tmp_path / "part" / "summary.json").read_text())
    assert summary["resumed_from"].endswith("ckpt-000000052.pt") and summary["global_step"] == 90
    a, b = final_weights(tmp_path / "full" / "checkpoints"), final_weights(tmp_path / "part" / "checkpoints")
    assert a.keys() == b.keys() and any("running_mean" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the metrics of the resumed steps are the uninterrupted run's too
    recs = lambda d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    full_steps = {r_["step"]: r_.get("loss") for r_ in recs("full") if "loss" in r_}
    for r_ in recs("part"):
        if "loss" in r_ and r_["step"] > 60:
            assert r_["loss"] == full_steps[r_["step"]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_on_another_world_size(scene, resumed, backend):
    tmp_path, job = scene  # stopped at step 40 on 2 ranks, resumed on 3
    output, runs = resumed["test_resume_on_another_world_size", backend]
    assert output.count("resuming a 2-rank checkpoint on 3 ranks") == runs, output[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    steps3 = (1800 // (3 * 16))  # training rows // (ranks × batch)
    # 40 steps × 2 ranks × 16 = 1280 samples of epoch 0 seen: 26 steps of 3 ranks, then the rest
    assert summary["world"]["size"] == 3 and summary["global_step"] == 2 * steps3
    assert summary["steps_this_run"] == 2 * steps3 - 1280 // (3 * 16)
    assert summary["final"]["val_accuracy"] > 0.5


@pytest.fixture(scope="module")
def refused_resumes(scenes, tmp_path_factory) -> dict:
    """backend -> the lines its two refused resumes raised: every backend's cases in one launch
    (`bad_input_lines`: each rank the same line, collectively; `mpidl train`'s exit 2 is test_train's)."""
    cases = {}
    for (name, backend), (folder, jobs) in scenes.items():
        if name == "test_corrupt_and_mismatched_checkpoints":
            mismatched, torn = jobs
            last = sorted((folder / "torn" / "checkpoints").glob("ckpt-*.pt"))[-1]
            last.write_bytes(last.read_bytes()[:200])
            cases[backend] = [["train", str(mismatched), "--resume", "--set", "model.args.hidden=[64]"],
                              ["train", str(torn), "--resume"]]
    argvs = [argv for backend in cases for argv in cases[backend]]
    lines = iter(bad_input_lines(2, argvs, cwd=tmp_path_factory.mktemp("refused")))
    return {backend: [next(lines), next(lines)] for backend in cases}


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_and_mismatched_checkpoints(scene, refused_resumes, backend):
    tmp_path, _ = scene  # both runs stopped at step 10
    mismatched, torn = refused_resumes[backend]
    assert "written by a different job" in mismatched, mismatched
    last = sorted((tmp_path / "torn" / "checkpoints").glob("ckpt-*.pt"))[-1]
    assert torn.startswith(f"{last}: corrupt checkpoint"), torn
    assert not list((tmp_path / "torn" / "checkpoints").glob(".*tmp*"))
