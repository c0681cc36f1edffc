"""The no-communication baseline: every rank steps on its own gradients, nothing is sent.

A scaling study runs it at every size beside the real backends. Ranks do exactly the same
per-rank work (data, forward, backward, update) concurrently and never wait for each other,
so what they lose against one lone rank is what sharing cores, memory bandwidth and caches
costs; what a real backend loses beyond it is communication and its framework.

A synchronous data-parallel step cannot run faster than the slowest rank, so the baseline's
pace is its slowest rank's: the trainer averages a log window's step time over ranks through
`average()`, and here the window's `time` is the maximum over ranks instead (the other
figures, and the per-bucket times, stay means). The ranks meet only there, once per log
window, outside the timed steps: a per-step barrier would charge the baseline for a
synchronisation mechanism (MPI's busy polling suffers badly when cores are shared) rather
than show the machine's limit. The models diverge, by design.
"""
from __future__ import annotations

import torch
from torch import nn

from mpidl import log
from mpidl.train.backends import Backend, broadcast_module


class NoCommBackend(Backend):
    name = "none"

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        broadcast_module(self.world, model)  # the same start as the other backends
        if self.world.size > 1 and self.world.rank == 0:
            log.get().warning("backend none: ranks do not average gradients (a scaling study's baseline): "
                              "their models diverge, and checkpoints hold rank 0's weights")
        return model, optimizer

    def sync_gradients(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        pass

    def average(self, metrics: dict[str, float]) -> dict[str, float]:
        out = super().average(metrics)
        if "time" in metrics and self.world.size > 1:
            from mpi4py import MPI

            out["time"] = self.world.comm.allreduce(float(metrics["time"]), op=MPI.MAX)
        return out
