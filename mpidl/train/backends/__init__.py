"""Gradient averaging behind one small interface: horovod (default), ddp, mpi; and none,
the no-communication baseline of scaling studies (each rank keeps its own gradients).

    backend = make_backend("horovod", world, options)
    model, optimizer = backend.prepare(model, optimizer)   # wrap; rank 0's state everywhere
    loss.backward()
    backend.sync_gradients(model, optimizer)               # block until gradients are averaged
    backend.step(optimizer)

Where the allreduce happens differs, and so does what `sync_gradients` measures:
horovod  allreduces start in backward hooks and overlap it; sync waits for the rest.
ddp      bucketed allreduces run inside backward (overlapped); sync is a no-op, so the
         trainer's "sync" time is zero and the communication sits in forward+backward.
mpi      nothing overlaps: sync flattens gradients into buckets and runs MPI Allreduce.
none     no gradient is sent and ranks never wait for each other; a log window's step time is
         the slowest rank's (the pace a synchronous step could at best keep).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch
from torch import nn

from mpidl import watchdog
from mpidl.errors import BadInput

NAMES = ("horovod", "ddp", "mpi", "none")


class Backend:
    name = "base"
    #: whether weights may be channels_last (non-contiguous); inputs may be channels_last anyway
    channels_last_weights = True

    def __init__(self, world, options: dict):
        self.world = world
        self.options = options

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        raise NotImplementedError

    def sync_gradients(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        raise NotImplementedError

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The parameter update, once `sync_gradients` has averaged the gradients."""
        with self.stepping(optimizer):
            optimizer.step()

    def stepping(self, optimizer: torch.optim.Optimizer) -> contextlib.AbstractContextManager:
        """The context of an optimizer's own step after `sync_gradients` (Horovod's: no second sync)."""
        return contextlib.nullcontext()

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[None]:
        """Micro-steps of gradient accumulation: gradients add up locally, nothing is sent."""
        yield

    def allreduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of `t` over ranks, for metrics: MPI on every backend (microseconds; Horovod's own
        allreduce would wait for its background thread's next cycle, ~1 ms a record)."""
        if self.world.size == 1:
            return t.clone()
        from mpi4py import MPI

        arr = t.detach().to("cpu", torch.float64).contiguous().numpy().copy()
        with watchdog.waiting("the metrics allreduce"):
            self.world.comm.Allreduce(MPI.IN_PLACE, arr, op=MPI.SUM)
        return torch.from_numpy(arr / self.world.size).to(t.device, t.dtype)

    def average(self, metrics: dict[str, float]) -> dict[str, float]:
        """Metrics averaged over ranks, in one allreduce."""
        keys = sorted(metrics)
        vec = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
        out = self.allreduce_mean(vec)
        return {k: float(v) for k, v in zip(keys, out)}

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model

    def close(self) -> None:
        pass


def broadcast_module(world, model: nn.Module) -> None:
    """Rank 0's parameters and buffers onto every rank, over MPI."""
    if world.size == 1:
        return
    with watchdog.waiting("the broadcast of rank 0's weights"):
        _broadcast_tensors(world, model)


def _broadcast_tensors(world, model: nn.Module) -> None:
    for t in list(model.state_dict().values()):
        if not torch.is_tensor(t) or t.numel() == 0:
            continue
        cpu = t.detach().to("cpu").contiguous()
        arr = cpu.numpy() if cpu.dtype != torch.bfloat16 else cpu.view(torch.int16).numpy()
        world.comm.Bcast(np.ascontiguousarray(arr), root=0)
        t.copy_(torch.from_numpy(arr).view(cpu.dtype) if cpu.dtype == torch.bfloat16 else torch.from_numpy(arr))


def make_backend(name: str, world, options: dict) -> Backend:
    if name == "horovod":
        try:
            from mpidl.train.backends.horovod import HorovodBackend
        except ImportError as e:
            raise BadInput(f"backend: horovod is not importable here ({e}); use backend: mpi or ddp, "
                           "or run `mpidl setup horovod`") from None
        return HorovodBackend(world, options)
    if name == "ddp":
        from mpidl.train.backends.ddp import DDPBackend

        return DDPBackend(world, options)
    if name == "mpi":
        from mpidl.train.backends.mpi import MPIBackend

        return MPIBackend(world, options)
    if name == "none":
        from mpidl.train.backends.nocomm import NoCommBackend

        return NoCommBackend(world, options)
    raise BadInput(f"backend: unknown backend {name!r} (choose from {', '.join(NAMES)})")
