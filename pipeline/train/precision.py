"""Numeric precision of a net's forward pass: float32, or bfloat16 autocast where the CPU has it.

Measured on this project's 2-core AVX-512 CPU (oneDNN kernels; ``bench/lungseg_speed.py
--precision``, 300 slices at 256²): the 16-wide lung U-Net's net time 2.35 s against 3.84 s in
float32, the 8-wide one's 1.17 s against 1.81 s; the 28³ multi-view classifier's 4-fold ensemble
trains in 341 s per seed against 483 (``bench/classify_adrenal.py``, 3 seeds each). Weights, optimizer
state, losses and the outputs handed on stay float32. ``"auto"`` takes bfloat16 only where oneDNN
reports bfloat16 support (AVX-512 and newer CPUs); elsewhere it would be emulated, slower than
float32.

Example:
    >>> import torch
    >>> with autocast("float32"):
    ...     torch.ones(2, 2) @ torch.ones(2, 2)
    tensor([[2., 2.],
            [2., 2.]])
"""

from __future__ import annotations

import functools
from contextlib import AbstractContextManager
from typing import Literal

import torch

from pipeline.config import Precision

__all__ = ["autocast", "resolve"]


@functools.cache
def _bf16_supported() -> bool:
    """Whether oneDNN has bfloat16 kernels for this CPU (a private torch query; False if absent)."""
    query = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(query and query())


def resolve(precision: Precision) -> Literal["float32", "bfloat16"]:
    """``precision`` with ``"auto"`` replaced by what this machine runs fastest."""
    if precision == "auto":
        return "bfloat16" if _bf16_supported() else "float32"
    return precision


def autocast(precision: Precision, device: str = "cpu") -> AbstractContextManager:
    """A ``torch.autocast`` context for ``precision`` (disabled for float32)."""
    enabled = resolve(precision) == "bfloat16"
    return torch.autocast(device, dtype=torch.bfloat16, enabled=enabled)
