"""Randomness a run must reproduce: the per-step seeds, and the generators' state as plain values.

Every rank reseeds its generators at every step from (seed, step, rank), so the draws of a step
(dropout, crop, flip) depend on nothing else and a resumed run continues bit for bit. The global
generators' states (for code that draws from them between steps) go into checkpoints as
tensors and plain numbers, which `torch.load(weights_only=True)` reads without running code.
"""
from __future__ import annotations

import random

import numpy as np
import torch

_U64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finaliser: a cheap, well-spread 64-bit hash (a few hundred ns in Python)."""
    x = (x + 0x9E3779B97F4A7C15) & _U64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _U64
    return x ^ (x >> 31)


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of one rank's random draws at one step: a pure function of (seed, step, rank)."""
    return _mix(_mix(_mix(seed & _U64) ^ step) ^ rank)


def numpy_state_plain(state: tuple) -> dict:
    """`np.random.get_state()` as a tensor and plain numbers."""
    name, keys, pos, has_gauss, cached = state
    return {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def capture() -> dict:
    """The global generators' states (torch, numpy, random), as plain values."""
    return {"torch": torch.get_rng_state(), "numpy": numpy_state_plain(np.random.get_state()),  # type: ignore[arg-type]  # a tuple for the global MT19937 (the stub says dict)
            "python": random.getstate()}


def restore(rng: dict) -> None:
    """Put back what `capture` took."""
    torch.set_rng_state(rng["torch"])
    n = rng["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
