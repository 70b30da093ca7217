"""Where tensors live, in what precision the matmuls run, and whether hot loops are compiled.

``device()`` is CUDA when present, else CPU, overridable with ``PAPERLIB_DEVICE``.
``resolve_device(requested)`` is the one check every entry point (CLI, training, matching) applies
to a device it is given: ``None``/``"auto"`` mean ``device()``; a device this machine does not have
(``"cuda"`` without a GPU, ``"cuda:3"`` on a two-GPU machine) is refused up front with the fix,
instead of a bare torch assertion deep inside a run or being silently ignored.
``matmul_precision(precision, device)`` is the autocast context of a training step: ``"bf16"``
runs matmuls with bfloat16 inputs (fp32 accumulation; weights, optimizer state, losses and
elementwise maths stay fp32), ``"fp32"`` runs everything in fp32, ``"auto"`` is bf16 on CUDA and
fp32 on CPU, ``"native"`` is bf16 wherever the hardware multiplies bf16 natively (CUDA, CPUs with
AVX512-BF16 or AMX) and fp32 elsewhere. bf16 roughly doubles GEMM-bound training on GPUs and triples
it on CPUs with AVX512-BF16/AMX, at the price of ~3 significant digits in each matmul's inputs; on a
CPU without them (``cpu_has_native_bf16()`` false) bf16 is emulated: a 3-seed batch of [1,024 × 576] ×
[576 × 1,152] products ran 54× slower than in fp32 on a 2-core AVX2 AMD EPYC (2 against 109 GFLOP/s).
``maybe_compile`` wraps a function with ``torch.compile`` (fused CPU/GPU kernels: the SAE training
step is bound by elementwise memory traffic, which fusion removes) and falls back to eager
execution, with one warning, when compilation is disabled (``PAPERLIB_COMPILE=0``) or fails, e.g. on
a machine without a C++ compiler. Both paths compute the same function; tests check they agree.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from paperlib._stack import user_stacklevel

F = TypeVar("F", bound=Callable)


def device() -> torch.device:
    """The device paperlib computes on: ``PAPERLIB_DEVICE`` if set, else CUDA if present, else CPU."""
    requested = os.environ.get("PAPERLIB_DEVICE", "").strip()
    if requested and requested != "auto":
        return resolve_device(requested, "PAPERLIB_DEVICE", "unset it or set it to 'cpu' or 'auto'")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(
    requested: str | torch.device | None,
    what: str = "device",
    fix: str = "use device='cpu' or device='auto' (the best device this machine has)",
) -> torch.device:
    """``requested`` as a torch device that exists on this machine; ``None`` or ``"auto"``: ``device()``.

    ``what`` names the input in the message (a parameter, a flag, an environment variable) and
    ``fix`` says how to change it there; the check is cheap and loads no CUDA context."""
    if requested is None or (isinstance(requested, str) and requested.strip().lower() == "auto"):
        return device()
    if not isinstance(requested, (str, torch.device)):
        raise ValueError(f"{_named(what, requested)} is not a device name; {fix}")
    try:
        dev = torch.device(requested.strip() if isinstance(requested, str) else requested)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(
            f"{_named(what, requested)} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1'); {fix}"
        ) from exc
    if dev.type == "cpu":
        return dev
    backend = getattr(torch, dev.type, None)
    available = bool(backend is not None and hasattr(backend, "is_available") and backend.is_available())
    if dev.type == "mps":
        available = torch.backends.mps.is_available()
    if not available:
        raise ValueError(f"{_named(what, requested)}: {dev.type} is not available on this machine; {fix}")
    count = getattr(backend, "device_count", None)
    if dev.index is not None and callable(count) and dev.index >= count():
        raise ValueError(
            f"{_named(what, requested)}: this machine has {count()} {dev.type} device(s) (0..{count() - 1}); {fix}"
        )
    return dev


def _named(what: str, value) -> str:
    """How the message shows the input: ``--device cuda`` for a flag, ``device='cuda'`` otherwise."""
    value = str(value) if isinstance(value, torch.device) else value
    return f"{what} {value}" if what.startswith("--") else f"{what}={value!r}"


PRECISIONS = ("auto", "native", "fp32", "bf16")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 dot products (AVX512-BF16 or AMX) that torch's oneDNN matmuls use."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()[:200_000]
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, dev: torch.device | str) -> str:
    """``"fp32"`` or ``"bf16"``: what ``precision`` (one of ``PRECISIONS``) means on ``dev``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    kind = torch.device(dev).type
    if precision == "auto":
        return "bf16" if kind == "cuda" else "fp32"
    if precision == "native":
        return "bf16" if kind == "cuda" or (kind == "cpu" and cpu_has_native_bf16()) else "fp32"
    return precision


def matmul_precision(precision: str, dev: torch.device | str) -> contextlib.AbstractContextManager:
    """Autocast to bf16 matmuls when ``precision`` resolves to bf16 on ``dev``, else a no-op."""
    dev = torch.device(dev)
    if resolve_precision(precision, dev) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=dev.type, dtype=torch.bfloat16)


def compile_enabled() -> bool:
    """False when ``PAPERLIB_COMPILE`` is ``0``/``false``/``no``."""
    return os.environ.get("PAPERLIB_COMPILE", "1").strip().lower() not in {"0", "false", "no", "off"}


def _allow_many_shapes(limit: int = 64) -> None:
    """One process may train many banks (a k-sweep, a width family), each its own static graph;
    dynamo's default of 8 graphs per function would send the later ones to eager, 2x slower."""
    import torch._dynamo.config as dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo, name):
            setattr(dynamo, name, max(getattr(dynamo, name), limit))


def maybe_compile(fn: F) -> F:
    """``torch.compile(fn)`` with a permanent eager fallback after the first compilation failure."""
    compiled = None
    failed = False

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        nonlocal compiled, failed
        if failed or not compile_enabled():
            return fn(*args, **kwargs)
        if compiled is None:
            _allow_many_shapes()
            compiled = torch.compile(fn, dynamic=False)
        try:
            return compiled(*args, **kwargs)
        except Exception as exc:  # compiler missing or unsupported backend: stay correct, run eager
            failed = True
            warnings.warn(
                f"torch.compile failed ({type(exc).__name__}: {exc}); running {fn.__name__} eagerly",
                stacklevel=user_stacklevel(),
            )
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@functools.cache
def cpu_signature() -> str:
    """The CPU's feature flags: what ``-march=native`` compiles for and what decides which GEMM is
    faster, so compiled kernels and measured choices are cached per signature."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()
