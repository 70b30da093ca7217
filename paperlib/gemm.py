"""Exact float32 matmuls through oneDNN on CPU, where torch's default (MKL) leaves half the machine idle.

torch runs a float32 matmul on CPU through MKL. On AMD CPUs MKL stays far below the AVX-512 rate:
on the 2-core AMD EPYC (Zen 5) we develop on, MKL reaches 150-200 GFLOP/s, oneDNN (which torch also
ships and already uses for its bfloat16 matmuls) 290-440 GFLOP/s on the same shapes, and a pure
FMA loop ~520. Both are plain float32 (no reduced-precision accumulation): their results differ by
float rounding only, and oneDNN's do not depend on the thread count (tested). On tiny shapes MKL
wins (a [512, 16] x [16, 32] product is 2x slower in oneDNN), hence ``MIN_DIM``.

Only used where no autograd graph passes through (oneDNN's linear op has no derivative here), outside
autocast (there torch already picks oneDNN for bf16), and on CPU. ``PAPERLIB_ONEDNN=0`` turns it off;
a torch build without the op falls back to ``torch.addmm``.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

MIN_DIM = 64  # oneDNN is measured faster once every dimension of the product is at least this


def enabled() -> bool:
    return os.environ.get("PAPERLIB_ONEDNN", "1") != "0"


@functools.cache
def _linear():
    """torch's oneDNN linear (weight given as [out, in]), or None where this torch lacks it."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


def applies(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> bool:
    """Whether ``addmm(bias, x, weight)`` takes the oneDNN route."""
    if not enabled() or _linear() is None or torch.is_autocast_enabled("cpu"):
        return False
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    return (not needs_grad and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and x.dim() == weight.dim() == 2 and min(*x.shape, weight.shape[1]) >= MIN_DIM)


def addmm(bias: Tensor | None, x: Tensor, weight: Tensor) -> Tensor:
    """``bias + x @ weight`` for ``x`` [m, k] and ``weight`` [k, n], through oneDNN where it applies."""
    if applies(x, weight, bias):
        return _linear()(x, weight.T, bias, "none", [], "")
    return x @ weight if bias is None else torch.addmm(bias, x, weight)
