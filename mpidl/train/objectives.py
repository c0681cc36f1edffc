"""What a training step minimises: the loss is a piece a workload can replace.

An objective runs the forward pass itself (so one that needs a second model, such as a
distillation teacher, can run it on the same batch) and returns the loss and the outputs.
`counts` gives per-batch sums the record turns into metrics (e.g. correct predictions).
"""
from __future__ import annotations

import torch
from torch import nn


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
