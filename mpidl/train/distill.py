"""Knowledge distillation: a trained teacher (any mpidl run folder) guides a smaller student.

    loss = alpha · T² · KL(p_teacher ‖ p_student) + (1 − alpha) · CE(student, labels)

with p = softmax(logits / T) (Hinton et al. 2015: the T² keeps the soft term's gradients on the
scale of the hard one's as T changes; the KL runs from the teacher's distribution to the
student's, as F.kl_div(log p_student, p_teacher) computes it). The teacher sees the student's
batches (the same shards, after the same preprocessing), in eval mode under no_grad, in bf16
on a GPU. Records carry `teacher_accuracy` beside the student's `accuracy`; the summary gets a
`distill` entry: both models' held-out accuracy, parameter count and inference throughput.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from mpidl.errors import BadInput
from mpidl.spec import JobSpec
from mpidl.train.callbacks import Callback
from mpidl.train.models import model_for
from mpidl.train.objectives import Objective
from mpidl.train.runs import TrainedRun, build_model, load_run

KEY = "distill.teacher"


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class Distillation(Objective):
    name = "distillation"
    ratios = {"accuracy": "correct", "teacher_accuracy": "teacher_correct"}

    def __init__(self, teacher: nn.Module, alpha: float, temperature: float, device: torch.device):
        self.teacher, self.alpha, self.temperature = teacher, alpha, temperature
        # bf16 on a GPU whatever the student's precision; fp32 on CPU, where bf16 is slower
        self.teacher_autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" \
            else (lambda: torch.autocast("cpu", enabled=False))
        self._teacher_out: torch.Tensor | None = None

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self.teacher_autocast():
            return self.teacher(x).float()

    def __call__(self, model, x, y):
        t = self.teacher_logits(x)
        s = model(x)
        sf, T = s.float(), self.temperature
        soft = F.kl_div(F.log_softmax(sf / T, dim=1), F.log_softmax(t / T, dim=1), reduction="batchmean",
                        log_target=True) * (T * T)
        hard = F.cross_entropy(sf, y)
        self._teacher_out = t
        return self.alpha * soft + (1 - self.alpha) * hard, s

    def counts(self, out, y):
        t, self._teacher_out = self._teacher_out, None
        assert t is not None  # set by __call__ on this batch
        return {"correct": (out.detach().float().argmax(1) == y).sum(), "teacher_correct": (t.argmax(1) == y).sum()}


def load_teacher(spec: JobSpec, inputs, device: torch.device) -> tuple[nn.Module, TrainedRun]:
    """The teacher of `spec.distill`, checked against this job; BadInput on a mismatch."""
    assert spec.distill is not None  # a distillation job
    run = load_run(spec.distill.teacher, KEY)
    src = inputs.train_source
    if not inputs.classify:
        raise BadInput(f"distill: needs integer class labels; '{src.keys[1]}' in {src.files[0]} is "
                       f"{src.dtypes[src.keys[1]]}")
    teacher = build_model(run, src, KEY)
    mine, theirs = spec.data.preprocess, run.spec.data.preprocess
    for field in ("scale_uint8", "standardize", "standardize_per"):
        if getattr(mine, field) != getattr(theirs, field):
            raise BadInput(f"{KEY}: {run.checkpoint}: the teacher was trained with data.preprocess.{field} = "
                           f"{getattr(theirs, field)}, this job has {getattr(mine, field)}")
    sample = (2, *src.shapes[src.keys[0]])
    with torch.no_grad():
        t_out = teacher(torch.zeros(sample)).shape[1]
    with torch.device("meta"):  # the student's output size without building it for real
        s_out = model_for(spec, src)(torch.empty(sample)).shape[1]
    if s_out != t_out:
        raise BadInput(f"{KEY}: {run.checkpoint}: the teacher ({run.spec.model.name}) has {t_out} outputs, "
                       f"the student ({spec.model.name}) {s_out}: they must match (model.args.num_classes)")
    return teacher.to(device), run


def distillation(spec: JobSpec, world, inputs, device: torch.device) -> tuple[Distillation, "DistillReport"]:
    teacher, run = world.agree(lambda: load_teacher(spec, inputs, device))
    d = spec.distill
    assert d is not None  # a distillation job
    objective = Distillation(teacher, d.alpha, d.temperature, device)
    return objective, DistillReport(objective, run)


def throughput(fn, x: torch.Tensor, sync, seconds: float = 0.5) -> float:
    """Samples per second of `fn(x)`: after a warm-up, batches for about `seconds`."""
    for _ in range(2):
        fn(x)
    sync()
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < seconds:
        fn(x)
        n += 1
    sync()
    return n * x.shape[0] / (time.perf_counter() - t0)


class DistillReport(Callback):
    def __init__(self, objective: Distillation, run: TrainedRun):
        self.objective, self.run = objective, run

    def inference(self, trainer) -> dict[str, float]:
        """Samples/s of student and teacher on one held-out batch, alternating rounds (median)."""
        loader = trainer.inputs.val_loader or trainer.inputs.loader
        loader.set_epoch(0)
        batches = iter(loader)
        x = next(batches)[0].clone()
        batches.close()
        if trainer.channels_last and x.ndim == 4:
            x = x.to(memory_format=torch.channels_last)
        student, sync = trainer.net, (torch.cuda.synchronize if x.is_cuda else (lambda: None))

        def run_student(v):
            with trainer.autocast:
                return student(v)

        rates: dict[str, list[float]] = {"student": [], "teacher": []}
        student.eval()
        with torch.no_grad():
            for _ in range(3):
                rates["student"].append(throughput(run_student, x, sync))
                rates["teacher"].append(throughput(self.objective.teacher_logits, x, sync))
        student.train()
        self.batch = x.shape[0]
        return {k: statistics.median(v) for k, v in rates.items()}

    def on_end(self, trainer, summary: dict) -> None:
        rates = trainer.backend.average(self.inference(trainer))  # every rank measured its own device
        final = trainer.last_eval
        spec = trainer.spec
        summary["distill"] = {
            "alpha": spec.distill.alpha, "temperature": spec.distill.temperature,
            "student": {"model": spec.model.name, "parameters": parameters(trainer.net),
                        "val_accuracy": final.get("val_accuracy"), "inference_samples_per_s": rates["student"]},
            "teacher": {"model": self.run.spec.model.name, "checkpoint": str(self.run.checkpoint),
                        "parameters": parameters(self.objective.teacher),
                        "val_accuracy": final.get("val_teacher_accuracy"),
                        "inference_samples_per_s": rates["teacher"]},
            "inference_batch": self.batch, "inference_per": "rank (mean over ranks, all measuring at once)",
        }
        d = summary["distill"]
        trainer.log.info("distill: student %s %d params, accuracy %s, %.0f samples/s; teacher %s %d params, "
                         "accuracy %s, %.0f samples/s", d["student"]["model"], d["student"]["parameters"],
                         _fmt(d["student"]["val_accuracy"]), d["student"]["inference_samples_per_s"],
                         d["teacher"]["model"], d["teacher"]["parameters"], _fmt(d["teacher"]["val_accuracy"]),
                         d["teacher"]["inference_samples_per_s"])


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"

