"""Stop at the first non-finite loss, naming the step and the rank, before anything is saved.

A NaN or Inf loss poisons the weights at the next update and every rank's at the next
allreduce; training on would end "successfully" with `loss nan`. The check is a host read of
one flag per batch: free on CPU. On CUDA that read would stall the queue each step, so there
the flag of a batch is read at the next batch (by then the device is long past it), and
before every checkpoint, so no checkpoint is ever written after a non-finite loss.

The message says which it was: non-finite values in the batch (inputs or targets: the data),
or a finite batch (the model diverged).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from mpidl.errors import Diverged


class FiniteLoss:
    def __init__(self, rank: int, lagged: bool):
        self.rank, self.lagged = rank, lagged
        self._pending: Optional[tuple] = None  # (step, loss is finite, loss, x, y)

    def watch(self, step: int, loss: torch.Tensor, x: torch.Tensor,
              y: Optional[torch.Tensor] = None) -> Union[float, torch.Tensor]:
        """Check this batch's loss (on CUDA: the previous batch's); raise Diverged if not finite.

        Returns the loss for the record: a float where it was read here anyway (one host read,
        as a loop that logs does), else a device tensor to be summed on the device.
        """
        if not self.lagged:
            value = loss.item()
            if not math.isfinite(value):
                self._diverged(step, value, x, y)
            return value
        self.check()
        loss = loss.detach()
        self._pending = (step, torch.isfinite(loss).all(), loss, x, y)
        return loss.double()

    def check(self) -> None:
        if self._pending is None:
            return
        step, ok, loss, x, y = self._pending
        self._pending = None
        if not bool(ok):
            self._diverged(step, float(loss), x, y)

    def _diverged(self, step: int, value: float, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> None:
        bad, bad_y = _nonfinite(x), _nonfinite(y)
        if bad_y:
            held = (f"the target batch holds {bad_y} non-finite value{'s' if bad_y != 1 else ''}"
                    + (f" (and the input batch {bad})" if bad else "") + ": the data holds NaN or Inf, not the model")
        elif bad:
            held = f"the input batch holds {bad} non-finite value{'s' if bad != 1 else ''}"
        else:
            held = "the batch is finite: the model diverged (try a lower lr, or gradient clipping)"
        raise Diverged(f"non-finite loss ({value}) at step {step + 1} on rank {self.rank}; {held}")


def _nonfinite(t: Optional[torch.Tensor]) -> int:
    return int((~torch.isfinite(t)).sum()) if t is not None and t.is_floating_point() else 0
