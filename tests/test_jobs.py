"""The workload job specs in jobs/ end to end under `mpirun -np 2` on CPU, scaled down where
the README's figures need minutes: linear regression (as shipped), MobileNetV2 on uint8 images,
and distillation of that MobileNet into a small CNN."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import ROOT, cli_in_turn, has_horovod, mpidl_cmd, needs_cuda, run
from mpidl.data.synth import read_truth

BACKEND = [] if has_horovod() else ["--set", "backend=mpi"]


SMALL_IMAGES = ["--set", "precision=fp32", "--set", "data.synth.rows=3000", "--set", "data.synth.size=16",
                "--set", "data.synth.noise=60", "--set", "data.batch=32", "--set", "optimizer.lr=0.02"]


@pytest.fixture(scope="module")
def jobs_run(tmp_path_factory):
    """The three jobs in turn by one launch of 2 ranks: linear regression, MobileNet, then the
    distillation of that MobileNet (its teacher read from the run folder the MobileNet wrote)."""
    folder = tmp_path_factory.mktemp("jobs")
    cli_in_turn(2, [
        ["train", str(ROOT / "jobs" / "linear-regression.yaml"), *BACKEND,
         "--set", f"data.files={folder}/lin.h5", "--set", f"output={folder}/linear"],
        ["train", str(ROOT / "jobs" / "mobilenet-images.yaml"), *BACKEND, *SMALL_IMAGES,
         "--set", f"data.files={folder}/img.h5", "--set", f"output={folder}/mobilenet"],
        ["train", str(ROOT / "jobs" / "distill.yaml"), *BACKEND, *SMALL_IMAGES, "--set", "epochs=2",
         "--set", f"data.files={folder}/img.h5", "--set", f"distill.teacher={folder}/mobilenet",
         "--set", f"output={folder}/distill"]], timeout=1500)
    return folder


def test_linear_regression_job_recovers_the_rule(jobs_run):
    coef = json.loads((jobs_run / "linear" / "summary.json").read_text())["coefficients"]
    # against the rule the file stores, from the final checkpoint's weights
    truth = read_truth(str(jobs_run / "lin.h5"))
    state = torch.load(sorted((jobs_run / "linear" / "checkpoints").glob("ckpt-*.pt"))[-1], weights_only=True)
    w, b = state["model"]["1.weight"].double().numpy().T, state["model"]["1.bias"].double().numpy()
    assert truth["coef"].shape == w.shape == (16, 1) and truth["noise"] == 0.1
    assert coef["max_abs_error"] == pytest.approx(np.abs(w - truth["coef"]).max())
    assert coef["intercept_max_abs_error"] == pytest.approx(np.abs(b - truth["intercept"]).max())
    assert coef["max_abs_error"] < 0.005 and coef["intercept_max_abs_error"] < 0.005  # the README's tolerance
    assert coef["least_squares_standard_error"] == pytest.approx(0.1 / np.sqrt(36000))


def test_mobilenet_job_learns_the_images(jobs_run):
    summary = json.loads((jobs_run / "mobilenet" / "summary.json").read_text())
    assert summary["model"] == "mobilenet_v2" and summary["world"]["size"] == 2
    assert summary["final"]["val_accuracy"] >= 0.5  # 10 classes: chance is 0.1


def test_distill_job_from_the_mobilenet_run(jobs_run):
    d = json.loads((jobs_run / "distill" / "summary.json").read_text())["distill"]
    teacher_own = json.loads((jobs_run / "mobilenet" / "summary.json").read_text())["final"]["val_accuracy"]
    assert d["teacher"]["model"] == "mobilenet_v2" and d["student"]["model"] == "small_cnn"
    assert d["teacher"]["parameters"] == 700_490 and d["student"]["parameters"] == 5_514
    assert d["teacher"]["val_accuracy"] == pytest.approx(teacher_own, abs=1 / 300 + 1e-9)  # 300 held-out rows
    assert d["student"]["val_accuracy"] > 0.2
    assert d["student"]["inference_samples_per_s"] > 0 and d["teacher"]["inference_samples_per_s"] > 0


@needs_cuda
def test_mobilenet_and_distill_jobs_in_bf16_on_a_gpu(tmp_path):
    """As shipped (bf16 autocast, channels_last; the teacher in bf16), one rank on the GPU."""
    assert SMALL_IMAGES[:2] == ["--set", "precision=fp32"]
    small = SMALL_IMAGES[2:] + ["--set", "epochs=1"]  # the jobs' own bf16
    common = [*BACKEND, *small, "--set", f"data.files={tmp_path}/img.h5"]
    r = run(mpidl_cmd("train", str(ROOT / "jobs" / "mobilenet-images.yaml"), *common,
                      "--set", f"output={tmp_path}/mobilenet"), timeout=600)
    assert r.returncode == 0, r.output[-3000:]
    r = run(mpidl_cmd("train", str(ROOT / "jobs" / "distill.yaml"), *common, "--set", f"output={tmp_path}/distill",
                      "--set", f"distill.teacher={tmp_path}/mobilenet"), timeout=600)
    assert r.returncode == 0, r.output[-3000:]
    summary = json.loads((tmp_path / "distill" / "summary.json").read_text())
    assert summary["precision"] == "bf16" and summary["world"]["device"].startswith("cuda")
    assert summary["distill"]["teacher"]["val_accuracy"] > 0.1
