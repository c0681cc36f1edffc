"""Evaluation on the held-out split: loss and the objective's metrics, averaged over ranks."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn

from mpidl.data import ShardedLoader
from mpidl.train.objectives import Objective
from mpidl.train.state import sync_buffers


def evaluate(world, backend, model: nn.Module, net: nn.Module, loader: Optional[ShardedLoader],
             objective: Objective, autocast=None, channels_last: bool = False) -> dict:
    """`val_loss` and `val_<metric>` over this rank's share of the held-out rows, then all ranks'.

    BatchNorm statistics are averaged first, so every rank evaluates the same model.
    """
    if loader is None:
        return {}
    sync_buffers(world, net)
    model.eval()
    sums: dict[str, float] = {"loss": 0.0, "count": 0.0}
    with torch.no_grad(), (autocast or contextlib.nullcontext()):
        loader.set_epoch(0)
        for x, y in loader:
            if channels_last and x.ndim == 4:
                x = x.to(memory_format=torch.channels_last)
            loss, out = objective(model, x, y)
            sums["loss"] += float(loss) * x.shape[0]
            for k, v in objective.counts(out, y).items():
                sums[k] = sums.get(k, 0.0) + float(v)
            sums["count"] += x.shape[0]
    model.train()
    for k in objective.counts_keys():
        sums.setdefault(k, 0.0)
    avg = backend.average(sums)
    res = {"val_loss": avg["loss"] / avg["count"]}
    for name, key in objective.ratios.items():
        res[f"val_{name}"] = avg[key] / avg["count"]
    return res
