"""Post-training quantization of trained runs (`mpidl quantize RUN_DIR`)."""
from __future__ import annotations

from mpidl.quant.quantize import quantize_run, render

__all__ = ["quantize_run", "render"]
