"""Pure MPI data parallelism: gradients flattened into buckets, averaged with Allreduce.

Works wherever mpi4py does (no Horovod, no torch.distributed). Nothing overlaps backward;
the point is a transparent reference to compare the other backends with.
"""
from __future__ import annotations

import numpy as np
import torch
from mpi4py import MPI
from torch import nn

from mpidl.train.backends import Backend, broadcast_module


class MPIBackend(Backend):
    name = "mpi"

    def __init__(self, world, options: dict):
        super().__init__(world, options)
        self.bucket_bytes = int(float(options.get("bucket_mb", 25)) * 2**20)
        self._params: list[torch.nn.Parameter] = []
        self._buffers: list[np.ndarray] = []

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        broadcast_module(self.world, model)
        self._params = [p for p in model.parameters() if p.requires_grad]
        # Buckets of whole tensors up to bucket_mb, float32 or float64 as the parameters are.
        self._buckets: list[list[torch.nn.Parameter]] = []
        cur: list[torch.nn.Parameter] = []
        size = 0
        for p in self._params:
            nbytes = p.numel() * p.element_size()
            if cur and (size + nbytes > self.bucket_bytes or p.dtype != cur[0].dtype):
                self._buckets.append(cur)
                cur, size = [], 0
            cur.append(p)
            size += nbytes
        if cur:
            self._buckets.append(cur)
        self._buffers = [np.empty(sum(p.numel() for p in b), dtype=torch.empty(0, dtype=b[0].dtype).numpy().dtype)
                         for b in self._buckets]
        return model, optimizer

    def sync_gradients(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if self.world.size == 1:
            return
        for bucket, flat in zip(self._buckets, self._buffers):
            pos = 0
            for p in bucket:
                n = p.numel()
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                flat[pos:pos + n] = g.detach().reshape(-1).to("cpu").numpy()
                pos += n
            self.world.comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
            flat /= self.world.size
            pos = 0
            for p in bucket:
                n = p.numel()
                avg = torch.from_numpy(flat[pos:pos + n]).view_as(p).to(p.device)
                if p.grad is None:
                    p.grad = avg.clone()
                else:
                    p.grad.copy_(avg)
                pos += n
