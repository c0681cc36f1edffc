"""mpidl: data-parallel PyTorch training on HPC clusters.

Your own loop, data-parallel and preemption-safe:

    world = mpidl.init()                     # rank, size, local_rank, device, launcher; fail-fast armed
    loader = mpidl.ShardedLoader(mpidl.H5Source("train.h5"), world, batch_size=64)
    with mpidl.Run("runs/mine", model, optimizer, loader, epochs=10) as run:
        model, optimizer = run.model, run.optimizer
        for epoch in run.epochs():
            for x, y in run.batches():
                ...                          # your step: forward, loss, backward, optimizer.step()
                run.log(loss=loss)

`mpidl train JOB.yaml` drives the same parts from a job spec.
"""
from __future__ import annotations

import importlib
from typing import Any

from mpidl.errors import BadInput
from mpidl.world import World, current, init

__version__ = "0.1.0"

# Loaded on first use: `import mpidl` (and `mpidl --help`) need not import torch.
_LAZY = {"Run": "mpidl.train.run", "H5Source": "mpidl.data.layout", "ShardedLoader": "mpidl.data.loader"}

__all__ = ["BadInput", "H5Source", "Run", "ShardedLoader", "World", "current", "init", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mpidl' has no attribute {name!r}")
