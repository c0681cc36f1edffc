"""Evaluation on the held-out split: loss and the objective's metrics over every held-out row."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn

from mpidl import watchdog
from mpidl.data import ShardedLoader
from mpidl.train.objectives import Objective
from mpidl.train.state import sync_buffers


def real_rows(loader: ShardedLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's held-out batches, padding cut off: over all ranks, every row of an evaluation
    loader's source exactly once. Real rows come first in a batch, so they are counted on the
    host (no read of the mask from the device); a batch of padding alone is skipped (the model
    is in eval mode: its forward pass sends nothing to other ranks)."""
    loader.set_epoch(0)
    left = loader.samples
    for x, y, _ in loader:
        n = min(x.shape[0], left)
        left -= n
        if n:
            yield (x, y) if n == x.shape[0] else (x[:n], y[:n])


def evaluate(world, backend, model: nn.Module, net: nn.Module, loader: Optional[ShardedLoader],
             objective: Objective, autocast=None, channels_last: bool = False) -> dict:
    """`val_loss` and `val_<metric>` over every held-out row (each rank its share, then all
    ranks'), and `val_samples`, how many rows that was.

    BatchNorm statistics are averaged first, so every rank evaluates the same model.
    """
    if loader is None:
        return {}
    sync_buffers(world, net)
    model.eval()
    # summed on the device, read once at the end: no host sync per batch on a GPU
    sums: dict = {"loss": 0.0, "count": 0.0, **{k: 0.0 for k in objective.counts_keys()}}
    # each batch is progress; the first (cold files, a compiled model's eval-mode graph) may take long
    watchdog.mark("evaluation", "the first held-out batch", factor=watchdog.LONG, reads=True)
    with torch.no_grad(), (autocast or contextlib.nullcontext()):
        for i, (x, y) in enumerate(real_rows(loader)):
            watchdog.mark("evaluation", f"held-out batch {i + 1} of {len(loader)}", reads=True)
            if channels_last and x.ndim == 4:
                x = x.to(memory_format=torch.channels_last)
            loss, out = objective(model, x, y)
            sums["loss"] += loss.detach().double() * x.shape[0]
            for k, v in objective.counts(out, y).items():
                sums[k] = sums.get(k, 0.0) + v
            sums["count"] += x.shape[0]
    model.train()
    world.barrier("the other ranks' evaluation")  # asleep while a rank with more batches finishes
    with watchdog.waiting("the other ranks' evaluation"):
        avg = backend.average(sums)
    res = {"val_loss": avg["loss"] / avg["count"]}
    for name, key in objective.ratios.items():
        res[f"val_{name}"] = avg[key] / avg["count"]
    res["val_samples"] = round(avg["count"] * world.size)
    return res
