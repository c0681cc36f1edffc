"""The no-communication baseline: every rank steps on its own gradients.

A scaling study runs it at every size beside the real backends. Ranks do exactly the same
per-rank work (forward, backward, update) concurrently, so what they lose against one lone
rank is what sharing cores, memory bandwidth and caches costs; what a real backend loses
beyond it is communication and its framework.

Ranks still meet once per step with a zero-byte barrier (the `sync` bucket): a synchronous
data-parallel step runs at the slowest rank's pace, so that is the limit any backend can reach,
and the barrier's wait shows how uneven the ranks are. The models diverge, by design; the
loss it logs is each rank's own, averaged.
"""
from __future__ import annotations

import torch
from torch import nn

from mpidl.train.backends import Backend, broadcast_module


class NoCommBackend(Backend):
    name = "none"

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        broadcast_module(self.world, model)  # the same start as the other backends
        return model, optimizer

    def sync_gradients(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if self.world.size > 1:
            self.world.comm.Barrier()
