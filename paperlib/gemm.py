"""Exact float32 matmuls through oneDNN on CPU, where torch's default (MKL) leaves half the machine idle.

torch runs a float32 matmul on CPU through MKL. On AMD CPUs MKL stays far below the AVX-512 rate:
on the 2-core AMD EPYC (Zen 5) we develop on, MKL reaches 150-200 GFLOP/s, oneDNN (which torch also
ships and already uses for its bfloat16 matmuls) 290-440 GFLOP/s on the same shapes, and a pure
FMA loop ~520. Both are plain float32 (no reduced-precision accumulation): their results differ by
float rounding only, and oneDNN's do not depend on the thread count (tested). On tiny shapes MKL
wins (a [512, 16] x [16, 32] product is 2x slower in oneDNN), hence ``MIN_DIM``.

On Intel CPUs the order reverses: on a 2-core Xeon (Sapphire Rapids) MKL is 3-20 % faster than
oneDNN on the LLM notebooks' shapes (327-378 against 253-344 GFLOP/s, 2026-12-05), so by default the
oneDNN route is taken on AMD CPUs only. The choice is a fixed rule per CPU vendor, not a timing
race, so one machine always computes the same numbers.

Only used where no autograd graph passes through (oneDNN's linear op has no derivative here), outside
autocast (there torch already picks oneDNN for bf16), and on CPU. ``PAPERLIB_ONEDNN=1`` forces it on,
``0`` off, ``auto`` (the default) is the vendor rule; a torch build without the op falls back to
``torch.addmm``.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

MIN_DIM = 64  # oneDNN is measured faster once every dimension of the product is at least this


SETTINGS = ("auto", "0", "1")


@functools.cache
def cpu_vendor() -> str:
    """The CPU's vendor string (e.g. AuthenticAMD, GenuineIntel); empty where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def enabled() -> bool:
    """Whether fp32 matmuls may take the oneDNN route: ``PAPERLIB_ONEDNN``, else the vendor rule."""
    setting = os.environ.get("PAPERLIB_ONEDNN", "auto")
    if setting not in SETTINGS:
        raise ValueError(f"PAPERLIB_ONEDNN must be one of {', '.join(SETTINGS)}, got {setting!r}: unset it to "
                         "let the CPU vendor decide (oneDNN on AMD, MKL elsewhere)")
    return setting == "1" or (setting == "auto" and cpu_vendor() == "AuthenticAMD")


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
