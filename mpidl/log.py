"""Rank-aware logging: rank 0 logs info; other ranks warnings and errors only, prefixed."""
from __future__ import annotations

import logging
import sys

_configured = False


def setup(rank: int, size: int, level: int = logging.INFO) -> logging.Logger:
    """Configure the `mpidl` logger for this rank (idempotent)."""
    global _configured
    logger = logging.getLogger("mpidl")
    if _configured:
        return logger
    handler = logging.StreamHandler(sys.stderr if rank else sys.stdout)
    prefix = f"[rank {rank}] " if size > 1 and rank else ""
    handler.setFormatter(logging.Formatter(f"{prefix}%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(level if rank == 0 else max(level, logging.WARNING))
    logger.propagate = False
    _configured = True
    return logger


def get() -> logging.Logger:
    return logging.getLogger("mpidl")
