"""What a training step minimises: the loss is a piece a workload can replace.

An objective runs the forward pass itself (so one that needs a second model, such as a
distillation teacher, can run it on the same batch) and returns the loss and the outputs.
`counts` gives per-batch sums the record turns into metrics (e.g. correct predictions).
A job spec's `objective:` and `metrics:` name yours (`build_objective`).
"""
from __future__ import annotations

import torch
from torch import nn

from mpidl import usercode


class Objective:
    """Base: the loss of `model` on a batch, and the sums to log besides it."""

    name = "objective"
    #: metric name -> the count it is divided by the sample count to give (e.g. accuracy <- correct)
    ratios: dict[str, str] = {}

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def counts(self, out: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sums over the batch, kept on the device until the record reads them."""
        return {}

    def counts_keys(self) -> tuple[str, ...]:
        """The keys `counts` returns (every rank averages the same keys, even with no batch)."""
        return tuple(self.ratios.values())


class Classification(Objective):
    """Cross-entropy on integer labels; counts correct predictions."""

    name = "classification"
    ratios = {"accuracy": "correct"}

    def __init__(self) -> None:
        self.loss_fn = nn.CrossEntropyLoss()

    def __call__(self, model, x, y):
        out = model(x)
        return self.loss_fn(out.float(), y), out

    def counts(self, out, y):
        # argmax of float logits: bf16 ties would pick differently from fp32
        return {"correct": (out.detach().float().argmax(1) == y).sum()}


class Regression(Objective):
    """Mean squared error against float targets of the output's shape."""

    name = "regression"

    def __init__(self) -> None:
        self.loss_fn = nn.MSELoss()

    def __call__(self, model, x, y):
        out = model(x)
        return self.loss_fn(out.float(), y.float().reshape(out.shape)), out


def default_for(classify: bool) -> Objective:
    return Classification() if classify else Regression()


class LossObjective(Objective):
    """Your loss: `loss_fn(model(x), y)`; on integer labels it counts correct predictions too."""

    name = "loss"

    def __init__(self, loss_fn, classify: bool) -> None:
        self.loss_fn = loss_fn
        self.ratios = {"accuracy": "correct"} if classify else {}

    def __call__(self, model, x, y):
        out = model(x)
        return self.loss_fn(out, y), out

    def counts(self, out, y):
        if not self.ratios or out.ndim != 2:
            return {"correct": torch.zeros((), device=out.device)} if self.ratios else {}
        return {"correct": (out.detach().float().argmax(1) == y).sum()}


class WithMetrics(Objective):
    """An objective with your metrics beside its own: each `fn(output, target, **args)` gives a
    batch's count, logged divided by the samples (`top5_correct` -> the fraction in the top 5)."""

    def __init__(self, inner: Objective, metrics: dict) -> None:
        self.inner = inner
        self.metrics = metrics  # name -> callable(out, y)
        self.name = inner.name
        self.ratios = {**inner.ratios, **{name: f"metric_{name}" for name in metrics}}

    def __call__(self, model, x, y):
        return self.inner(model, x, y)

    def counts(self, out, y):
        own = dict(self.inner.counts(out, y))
        with torch.no_grad():
            for name, fn in self.metrics.items():
                value = fn(out.detach(), y)
                own[f"metric_{name}"] = value if torch.is_tensor(value) else torch.tensor(float(value))
        return own


def build_objective(spec, classify: bool) -> Objective:
    """The spec's objective (a built-in, or yours) with the spec's metrics."""
    o = spec.objective
    if o is None or o.name in ("classification", "regression"):
        objective = default_for(classify if o is None else o.name == "classification")
    else:
        target = usercode.resolve(o.name, "objective.name", spec.code_dirs)
        made = usercode.two_argument(target, o.args, "objective", o.name, "fn(output, target)")
        objective = made if isinstance(made, Objective) else LossObjective(made, classify)
    if spec.metrics:
        objective = WithMetrics(objective, {
            name: usercode.two_argument(usercode.resolve(m.name, f"metrics.{name}.name", spec.code_dirs), m.args,
                                        f"metrics.{name}", m.name, "fn(output, target)")
            for name, m in spec.metrics.items()})
    return objective
