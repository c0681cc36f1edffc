"""Gradient clipping by global norm and weight clipping: `optimizer.clip_grad_norm`, `clip_weights`.

Gradients are clipped after they are averaged over the ranks (the `after_sync` hook: after
Horovod's synchronize, DDP's backward, the mpi backend's allreduce) and before the step. Every
rank then holds the same averaged gradient, computes the same global norm and scales by the
same factor, so the ranks' parameters stay identical and equal those of one process stepping
on the whole global batch. Clipping each rank's own gradient before the average would clip a
different quantity on every rank and change the result with the world size.

Weights are clipped after every step (`after_step`): each parameter into [min, max], as WGAN
clips its critic, or each weight's rows — one output unit's incoming weights, for Linear and
Conv layers — to an L2 norm of at most max_norm (max-norm regularisation); biases and
BatchNorm parameters are left alone by max_norm.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from mpidl.spec import ClipWeightsSpec
from mpidl.train.callbacks import Callback


def clip_gradients(params: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale the gradients so their global L2 norm is at most `max_norm`; the norm before."""
    return torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm)


@torch.no_grad()
def clip_weights(model: nn.Module, clip: ClipWeightsSpec) -> None:
    """Each parameter into [min, max], or each weight row's L2 norm to at most max_norm."""
    for p in model.parameters():
        if clip.max_norm is None:
            p.clamp_(clip.min, clip.max)
        elif p.ndim >= 2:
            p.copy_(torch.renorm(p, 2, 0, clip.max_norm))


class Clipping(Callback):
    """The spec's clipping; training records get `grad_norm` (mean, before clipping) and
    `clipped` (the fraction of steps whose gradient was scaled down)."""

    def __init__(self, max_grad_norm: Optional[float], weights: Optional[ClipWeightsSpec]):
        self.max_grad_norm, self.weights = max_grad_norm, weights
        self._reset()

    def _reset(self) -> None:
        self.norm_sum: torch.Tensor | float = 0.0  # on the device: no host sync per step
        self.clipped: torch.Tensor | float = 0.0
        self.steps = 0

    def after_sync(self, trainer) -> None:
        if self.max_grad_norm is not None:
            norm = clip_gradients(trainer.net.parameters(), self.max_grad_norm).detach().double()
            self.norm_sum = self.norm_sum + norm
            self.clipped = self.clipped + (norm > self.max_grad_norm).double()
            self.steps += 1

    def after_step(self, trainer) -> None:
        if self.weights is not None:
            clip_weights(trainer.net, self.weights)

    def on_record(self, trainer, record: dict) -> None:
        # The averaged gradient is the same on every rank: its norm needs no averaging.
        if self.steps and "val_loss" not in record:
            record["grad_norm"] = float(self.norm_sum) / self.steps
            record["clipped"] = float(self.clipped) / self.steps
            self._reset()
