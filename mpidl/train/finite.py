"""Stop at the first non-finite loss, naming the step and the rank, before anything is saved.

A NaN or Inf loss poisons the weights at the next update and every rank's at the next
allreduce; training on would end "successfully" with `loss nan`. The check is a host read of
one flag per batch: free on CPU. On CUDA that read would stall the queue each step, so there
the flag of a batch is read at the next batch (by then the device is long past it), and
before every checkpoint, so no checkpoint is ever written after a non-finite loss.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from mpidl.errors import Diverged


class FiniteLoss:
    def __init__(self, rank: int, lagged: bool):
        self.rank, self.lagged = rank, lagged
        self._pending: Optional[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = None

    def watch(self, step: int, loss: torch.Tensor, x: torch.Tensor) -> Union[float, torch.Tensor]:
        """Check this batch's loss (on CUDA: the previous batch's); raise Diverged if not finite.

        Returns the loss for the record: a float where it was read here anyway (one host read,
        as a loop that logs does), else a device tensor to be summed on the device.
        """
        if not self.lagged:
            value = loss.item()
            if not math.isfinite(value):
                self._diverged(step, value, x)
            return value
        self.check()
        loss = loss.detach()
        self._pending = (step, torch.isfinite(loss).all(), loss, x)
        return loss.double()

    def check(self) -> None:
        if self._pending is None:
            return
        step, ok, loss, x = self._pending
        self._pending = None
        if not bool(ok):
            self._diverged(step, float(loss), x)

    def _diverged(self, step: int, value: float, x: torch.Tensor) -> None:
        bad = int((~torch.isfinite(x)).sum()) if x.is_floating_point() else 0
        held = (f"the input batch holds {bad} non-finite value{'s' if bad != 1 else ''}" if bad
                else "the input batch is finite: the model diverged (try a lower lr, or gradient clipping)")
        raise Diverged(f"non-finite loss ({value}) at step {step + 1} on rank {self.rank}; {held}")
