"""Knowledge distillation under real mpirun: a teacher from a trained run folder, a smaller
student on the same shards, the summary, the loss itself, and every bad teacher."""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from conftest import bad_input_lines, cli_in_turn
from mpidl.train.distill import Distillation


def job(folder, name: str, **over) -> str:
    """A 3-class tabular job (MLP) in `folder`; keys of `over` replace top-level sections."""
    spec = {
        "name": name, "seed": 1, "epochs": 2, "backend": "mpi",
        "data": {"files": str(folder / "tab.h5"), "batch": 16, "val_fraction": 0.2,
                 "synth": {"kind": "tabular", "rows": 2400, "features": 8, "classes": 3, "rule": "nonlinear"}},
        "model": {"name": "mlp", "args": {"hidden": [64, 64], "num_classes": 3}},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "output": str(folder / name), "log_every": 50,
    }
    spec.update(over)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def student_model(hidden=(8,), classes=3) -> dict:
    return {"name": "mlp", "args": {"hidden": list(hidden), "num_classes": classes}}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """The folder of the teacher's run and of the student's, trained in turn by one launch (the
    student's teacher read from the folder the teacher's run wrote)."""
    folder = tmp_path_factory.mktemp("distill")
    distill = {"teacher": str(folder / "teacher"), "alpha": 0.7, "temperature": 3.0}
    cli_in_turn(2, [["train", job(folder, "teacher")],
                    ["train", job(folder, "student", model=student_model(), distill=distill)]])
    return folder


def test_student_learns_from_the_teacher(teacher):
    summary = json.loads((teacher / "student" / "summary.json").read_text())
    d = summary["distill"]
    own = json.loads((teacher / "teacher" / "summary.json").read_text())["final"]["val_accuracy"]
    # the teacher rebuilt from its checkpoint scores exactly what it scored at the end of its own run
    assert d["teacher"]["val_accuracy"] == pytest.approx(own, abs=1e-12)
    assert d["teacher"]["checkpoint"].endswith(".pt") and d["teacher"]["model"] == "mlp"
    assert d["student"]["parameters"] == 8 * 8 + 8 + 8 * 3 + 3
    assert d["teacher"]["parameters"] == 8 * 64 + 64 + 64 * 64 + 64 + 64 * 3 + 3
    assert d["student"]["val_accuracy"] == summary["final"]["val_accuracy"] > 0.6  # chance: 1/3
    assert d["student"]["inference_samples_per_s"] > 0 and d["teacher"]["inference_samples_per_s"] > 0
    assert (d["alpha"], d["temperature"]) == (0.7, 3.0)
    # training records carry the teacher's accuracy on the same batches
    recs = [json.loads(line) for line in (teacher / "student" / "metrics.jsonl").read_text().splitlines()]
    assert all("teacher_accuracy" in rec for rec in recs if "loss" in rec)


def test_loss_is_soft_kl_times_t_squared_plus_hard_cross_entropy():
    torch.manual_seed(0)
    x, y = torch.randn(32, 8), torch.randint(0, 5, (32,))
    teacher, student = torch.nn.Linear(8, 5), torch.nn.Linear(8, 5)
    alpha, T = 0.3, 2.5
    loss, out = Distillation(teacher, alpha, T, torch.device("cpu"))(student, x, y)
    pt = torch.softmax(teacher(x).detach() / T, 1)
    ps = torch.softmax(student(x) / T, 1)
    kl = (pt * (pt.log() - ps.log())).sum(1).mean()  # KL(p_teacher ‖ p_student), per sample
    ce = -torch.log_softmax(student(x), 1)[torch.arange(32), y].mean()
    assert math.isclose(loss.item(), alpha * T * T * kl.item() + (1 - alpha) * ce.item(), rel_tol=1e-5)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())  # the teacher does not learn


def test_every_bad_teacher_is_one_line_agreed_by_every_rank(teacher):
    """Each bad teacher's one line, the cases in turn on the same 2 ranks (the exit status of
    `mpidl train`'s bad input: test_train)."""
    (teacher / "empty").mkdir()
    wide = {"files": str(teacher / "wide.h5"), "batch": 16,
            "synth": {"kind": "tabular", "rows": 600, "features": 12, "classes": 3}}
    cases = [  # (run name, spec sections, the line)
        ("s-missing", dict(model=student_model(), distill={"teacher": str(teacher / "nowhere")}), "distill.teacher: "),
        ("s-empty", dict(model=student_model(), distill={"teacher": str(teacher / "empty")}),
         "no checkpoint (ckpt-*.pt)"),
        ("s-wide", dict(data=wide, model=student_model(), distill={"teacher": str(teacher / "teacher")}),
         "does not fit inputs of shape (12,)"),
        ("s-five", dict(model=student_model(classes=5), distill={"teacher": str(teacher / "teacher")}),
         "the teacher (mlp) has 3 outputs, the student (mlp) 5"),
    ]
    lines = bad_input_lines(2, [["train", job(teacher, name, **over)] for name, over, _ in cases], cwd=teacher)
    for (name, _, expect), line in zip(cases, lines):
        assert expect in line, (name, line)
        assert not (teacher / name / "metrics.jsonl").exists(), name
