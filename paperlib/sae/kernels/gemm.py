"""Exact float32 matmuls through oneDNN on CPU, where torch's default (MKL) leaves half the machine idle.

torch runs a float32 matmul on CPU through MKL. On AMD CPUs MKL stays far below the AVX-512 rate:
on the 2-core AMD EPYC (Zen 5) we develop on, MKL reaches 150-200 GFLOP/s, oneDNN (which torch also
ships and already uses for its bfloat16 matmuls) 290-440 GFLOP/s on the same shapes, and a pure
FMA loop ~520. Both are plain float32 (no reduced-precision accumulation): their results differ by
float rounding only, and oneDNN's do not depend on the thread count (tested). On tiny shapes MKL
wins (a [512, 16] x [16, 32] product is 2x slower in oneDNN), hence ``MIN_DIM``.

On Intel CPUs the order reverses: on a 2-core Xeon (Sapphire Rapids) MKL is 3-20 % faster than
oneDNN on the LLM notebooks' shapes (327-378 against 253-344 GFLOP/s, 2026-12-05). So neither is
assumed: on first use both are timed on one representative product and the faster is kept, in a
small file in the cache keyed by the CPU's feature flags, torch's version and the thread count
(like the compiled kernels). Later processes read the choice instead of timing again, so one machine
keeps computing the same numbers.

Only used where no autograd graph passes through (oneDNN's linear op has no derivative here), outside
autocast (there torch already picks oneDNN for bf16), and on CPU. ``PAPERLIB_ONEDNN=1`` forces it on,
``0`` off, ``auto`` (the default) is the measured choice; a torch build without the op falls back to
``torch.addmm``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from pathlib import Path

import torch
from torch import Tensor

from paperlib.atomic import write_text
from paperlib.runtime import cpu_signature
from paperlib.store import default_root

MIN_DIM = 64  # oneDNN is measured faster once every dimension of the product is at least this


SETTINGS = ("auto", "0", "1")
PROBE = (2048, 768, 4096)  # [m, k] x [k, n]: between notebook 06's and the benchmark's encoder products


def _seconds(product, reps: int = 3) -> float:
    """Best of ``reps`` timed calls after one warm-up call."""
    product()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        product()
        best = min(best, time.perf_counter() - start)
    return best


def measure_onednn_faster() -> bool:
    """Time oneDNN's linear, then MKL (``torch.addmm``), on ``PROBE`` (best of 3 calls each)."""
    m, k, n = PROBE
    generator = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=generator) for shape in ((m, k), (k, n), (n,)))
    onednn = _seconds(lambda: _linear()(x, w.T, b, "none", [], ""))
    mkl = _seconds(lambda: torch.addmm(b, x, w))
    return onednn < mkl


def _choice_file() -> Path:
    key = hashlib.sha256("\n".join([cpu_signature(), torch.__version__, str(torch.get_num_threads())]).encode())
    return default_root() / "native" / f"gemm_choice_{key.hexdigest()[:20]}.json"


@functools.cache
def _measured_choice() -> bool:
    """The cached measurement for this CPU, torch and thread count; measured and stored if absent."""
    path = _choice_file()
    try:
        return bool(json.loads(path.read_text())["onednn"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent or unreadable: measure again
    faster = measure_onednn_faster()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(
            path,
            json.dumps(
                {"onednn": faster, "probe": PROBE, "torch": torch.__version__, "threads": torch.get_num_threads()}
            ),
        )
    except OSError:
        pass  # a read-only cache: measure again in the next process
    return faster


def enabled() -> bool:
    """Whether fp32 matmuls may take the oneDNN route: ``PAPERLIB_ONEDNN``, else the measured choice."""
    setting = os.environ.get("PAPERLIB_ONEDNN", "auto")
    if setting not in SETTINGS:
        raise ValueError(
            f"PAPERLIB_ONEDNN must be one of {', '.join(SETTINGS)}, got {setting!r}: unset it to "
            "use whichever of oneDNN and MKL was measured faster on this machine"
        )
    if setting != "auto":
        return setting == "1"
    return _linear() is not None and _measured_choice()


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
    if _linear() is None or torch.is_autocast_enabled("cpu"):
        return False
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    return (
        not needs_grad
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and x.dim() == weight.dim() == 2
        and min(*x.shape, weight.shape[1]) >= MIN_DIM
        and enabled()
    )  # last: the first call in a process may time both GEMMs


def writes_into(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> bool:
    """Whether ``addmm(bias, x, weight, out=...)`` writes into ``out`` (torch's route, outside autocast):
    oneDNN's op and autocast allocate their own result."""
    return not torch.is_autocast_enabled(x.device.type) and not applies(x, weight, bias)


def addmm(bias: Tensor | None, x: Tensor, weight: Tensor, out: Tensor | None = None) -> Tensor:
    """``bias + x @ weight`` for ``x`` [m, k] and ``weight`` [k, n], through oneDNN where it applies.
    ``out``: a float32 [m, n] tensor to write into where ``writes_into`` says so (the same numbers)."""
    if applies(x, weight, bias):
        return _linear()(x, weight.T, bias, "none", [], "")
    if out is not None and not torch.is_autocast_enabled(x.device.type):
        return torch.mm(x, weight, out=out) if bias is None else torch.addmm(bias, x, weight, out=out)
    return x @ weight if bias is None else torch.addmm(bias, x, weight)
