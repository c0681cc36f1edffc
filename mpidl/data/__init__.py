"""HDF5 data sharded across ranks: sources, the per-epoch plan, the prefetching loader.

The names load on first use: `mpidl --help` and commands that never read data need not
import torch (seconds on a busy node).
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {"ShardedLoader": "loader", "RankPlan": "shard", "plan_epoch": "shard", "plan_rank": "shard",
          "steps_per_epoch": "shard", "H5Source": "layout"}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"mpidl.data.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'mpidl.data' has no attribute {name!r}")
