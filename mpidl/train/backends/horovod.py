"""Horovod: hvd.DistributedOptimizer with named parameters; allreduces overlap backward.

Options (the job's `horovod:` section): compression none|fp16, op average|adasum,
fusion_threshold_mb and cycle_time_ms (set before hvd.init, as Horovod reads them then),
stall_check_s and stall_shutdown_s (a stuck rank missing from an allreduce: name it, then end the job;
the environment's HOROVOD_STALL_* apply when the spec leaves them out),
backward_passes_per_step (gradient accumulation, from the job's `accumulate`).
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Iterator

import horovod.torch as hvd  # at import time, so make_backend can report a missing Horovod
import torch
from torch import nn

from mpidl.train.backends import Backend
from mpidl.world import before_finalize

# Horovod's coordinator checks every stall_check_s, so Horovod shuts down between stall_shutdown_s
# and stall_shutdown_s + stall_check_s after a stall began (30-40 s here), and the job ends after.
STALL_DEFAULTS = {"stall_check_s": 10, "stall_shutdown_s": 30}

# Environment Horovod reads at init, set here unless the user's environment already has it
# (the job's fusion_threshold_mb / cycle_time_ms win over both). Measured by
# benchmarks/bench_allreduce.py, which runs Horovod with these same defaults.
DEFAULTS: dict[str, str] = {}

# How the training thread waits for allreduces still in flight. Horovod's synchronize() spins
# (sched_yield in a loop) until each one is done, and that thread shares its core with
# Horovod's background thread, which is the one driving MPI: the spin takes the core's time
# from the transfer. "sleep" polls with a short sleep instead; "spin" keeps Horovod's own wait.
WAIT_ENV = "MPIDL_HOROVOD_WAIT"


def wait(handles) -> None:
    """Return once every Horovod handle is done (then synchronize() no longer blocks)."""
    if os.environ.get(WAIT_ENV, "sleep") == "spin":
        return
    start = time.perf_counter()
    delay = 20e-6
    for h in handles:
        while not hvd.poll(h):
            time.sleep(delay)
            # At most ~0.2 ms late on a short wait, small beside a gradient allreduce; on a long
            # one (a peer still in its first step, a straggler) at most 1 % of the wait so far: a
            # rank polling every 0.2 ms takes a quarter of a core, which the late peer may need.
            delay = min(2 * delay, max(200e-6, 0.01 * (time.perf_counter() - start)), 5e-3)


class HorovodBackend(Backend):
    name = "horovod"
    # Horovod 0.28 rejects non-contiguous (channels_last) weights and gradients; with inputs alone
    # channels_last, convolutions still pick their NHWC kernels.
    channels_last_weights = False

    def __init__(self, world, options: dict):
        super().__init__(world, options)
        for key, value in DEFAULTS.items():
            os.environ.setdefault(key, value)
        if options.get("fusion_threshold_mb") is not None:
            os.environ["HOROVOD_FUSION_THRESHOLD"] = str(int(float(options["fusion_threshold_mb"]) * 2**20))
        if options.get("cycle_time_ms") is not None:
            os.environ["HOROVOD_CYCLE_TIME"] = str(options["cycle_time_ms"])
        # A rank whose training stops while its process lives (a hung read, a deadlock) is named
        # after stall_check_s and ends the job after stall_shutdown_s; Horovod itself only warns.
        # (A frozen process or a lost node stops Horovod's own coordination too: the launcher's.)
        for key, var in (("stall_check_s", "HOROVOD_STALL_CHECK_TIME_SECONDS"),
                         ("stall_shutdown_s", "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS")):
            if options.get(key) is not None:
                os.environ[var] = str(options[key])
            else:
                os.environ.setdefault(var, str(STALL_DEFAULTS[key]))
        self.hvd = hvd
        hvd.init()  # joins the MPI world mpidl.init() started
        before_finalize(hvd.shutdown)  # a bad-input exit after this point leaves through MPI_Finalize
        if hvd.rank() != world.rank or hvd.size() != world.size:
            raise RuntimeError(f"Horovod sees rank {hvd.rank()}/{hvd.size()}, MPI {world.rank}/{world.size}")

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        hvd = self.hvd
        compression = hvd.Compression.fp16 if self.options.get("compression") == "fp16" else hvd.Compression.none
        op = hvd.Adasum if self.options.get("op") == "adasum" else hvd.Average
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        # No hvd.broadcast_optimizer_state: DistributedOptimizer builds a new optimizer from the
        # param groups with empty state, so state loaded or broadcast before wrapping is lost
        # (momentum buffers, Adam moments: the cause of inexact resumes). The trainer loads the
        # checkpoint, which every rank already holds, into the wrapper returned here; and on an
        # empty state Horovod's broadcast would take a zero-gradient step that moves the weights.
        dist = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                        compression=compression, op=op,
                                        backward_passes_per_step=int(self.options.get("backward_passes_per_step", 1)))
        return model, dist

    def sync_gradients(self, model: nn.Module, optimizer) -> None:
        # The allreduces backward started; entries are (handle, ctx), a handle None or a
        # callable where Horovod has not started one yet (synchronize() does those).
        wait([h for h, _ in getattr(optimizer, "_handles", {}).values() if isinstance(h, int)])
        optimizer.synchronize()

    def stepping(self, optimizer):
        return optimizer.skip_synchronize()

    def zero_grad(self, optimizer) -> None:
        optimizer.zero_grad()  # Horovod 0.28's wrapper takes no set_to_none (torch's default is True)

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module, optimizer) -> Iterator[None]:
        # backward_passes_per_step counts the passes itself: the last one triggers the allreduce.
        yield

    def close(self) -> None:
        self.hvd.shutdown()
