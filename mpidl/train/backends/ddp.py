"""PyTorch DDP bootstrapped from the MPI world: no torchrun.

Rank 0 picks its address and a free port and broadcasts them over MPI; every rank then
joins a torch.distributed group (NCCL on CUDA, Gloo on CPU) with MPI's rank and size.
Across nodes the address is one every node can reach (`mpidl.net.rendezvous_address`, never
loopback), and Gloo and NCCL use the interface each node reaches it through, unless the user
chose one (MPIDL_NET, GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME). A collective that waits longer
than `timeout_s` (a rank or node gone silent) raises, which ends the job.
"""
from __future__ import annotations

import contextlib
import datetime
import inspect
import os
import socket
import sys
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mpidl import log, net, watchdog
from mpidl.errors import BadInput
from mpidl.train.backends import Backend, broadcast_module


def _rendezvous(across_nodes: bool):
    """(address, port) on rank 0, or the error message every rank will raise."""
    try:
        return net.rendezvous_address(across_nodes), _free_port()
    except BadInput as e:
        return str(e)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _allreduce_marked(state, bucket):
    """DDP's own allreduce of a gradient bucket (each gradient scaled by 1/size, then summed, as
    its reducer does without a hook), first telling the watchdog that this rank now waits for the
    others: DDP communicates inside backward, where a rank that waits looks like one that computes."""
    watchdog.wait_mark("the gradient allreduce (DDP, inside backward)")
    group = state if state is not None else dist.group.WORLD
    assert group is not None  # the default group exists once DDP wraps the model
    buffer = bucket.buffer()
    buffer.mul_(1.0 / group.size())
    return dist.all_reduce(buffer, group=group, async_op=True).get_future().then(lambda fut: fut.value()[0])


class DDPBackend(Backend):
    name = "ddp"

    def __init__(self, world, options: dict):
        super().__init__(world, options)
        self.device = torch.device(world.device)
        addr = _rendezvous(world.across_nodes) if world.rank == 0 else None
        if world.size > 1:
            addr = world.comm.bcast(addr, root=0)
        if isinstance(addr, str):  # rank 0 found no address: every rank says so (exit 2)
            raise BadInput(addr)
        assert addr is not None  # made by rank 0, which sent it to the others
        self.rendezvous = f"{addr[0]}:{addr[1]}"
        if world.across_nodes:
            # Gloo binds to whatever the host name resolves to, loopback included: name the
            # interface that leads to rank 0 instead (NCCL alike), unless the user named one.
            ifname = net.interface_towards(addr[0])
            os.environ.setdefault("GLOO_SOCKET_IFNAME", ifname)
            os.environ.setdefault("NCCL_SOCKET_IFNAME", "=" + ifname)
        # What Gloo (CPU) or NCCL (GPU) will bind to; None: the library's own choice (one node).
        self.interface = os.environ.get("NCCL_SOCKET_IFNAME" if self.device.type == "cuda" else "GLOO_SOCKET_IFNAME")
        log.get().info("ddp: rendezvous at %s, interface %s, collective timeout %g s", self.rendezvous,
                       self.interface or "(the library's choice)", float(self.options.get("timeout_s", 45)))
        if not dist.is_initialized():
            hook = sys.excepthook
            timeout = datetime.timedelta(seconds=float(self.options.get("timeout_s", 45)))
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                    init_method=f"tcp://{addr[0]}:{addr[1]}", rank=world.rank,
                                    world_size=world.size, timeout=timeout)
            # init_process_group wraps sys.excepthook to buffer stderr, and our hook aborts the
            # job from inside it, so the buffered traceback would be lost: keep ours.
            sys.excepthook = hook

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        broadcast_module(self.world, model)  # DDP broadcasts too; this keeps the three backends alike
        if self.world.size == 1:
            # Nothing to average: DDP's bucket copies and a one-rank allreduce would cost ~0.5 ms
            # a step of a small CPU model for nothing (Horovod, too, hooks nothing at size 1).
            return model, optimizer
        ids = [self.device.index] if self.device.type == "cuda" else None
        # Buffers (BatchNorm statistics) stay per rank, as with the other backends; the trainer
        # averages them before evaluation and checkpoints.
        no_buffer_sync: dict[str, Any] = ({"forward_sync_buffers": False}  # torch >= 2.13 renamed broadcast_buffers
                          if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                          else {"broadcast_buffers": False})
        wrapped = DistributedDataParallel(model, device_ids=ids,
                                          bucket_cap_mb=float(self.options.get("bucket_cap_mb", 25)),
                                          **no_buffer_sync)
        wrapped.register_comm_hook(None, _allreduce_marked)
        return wrapped, optimizer

    def sync_gradients(self, model: nn.Module, optimizer) -> None:
        pass  # done inside backward

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module, optimizer) -> Iterator[None]:
        with (model.no_sync() if isinstance(model, DistributedDataParallel) else contextlib.nullcontext()):
            yield

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, DistributedDataParallel) else model

    def close(self) -> None:
        if dist.is_initialized():
            # Tearing down while a peer still talks to us aborts Gloo's threads: meet first.
            # Drop DDP-wrapped models before this, or their process group outlives it.
            self.world.barrier("the end of the DDP process group")
            dist.destroy_process_group()
