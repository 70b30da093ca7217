"""A fused CPU kernel for the closed-form training step of small ReLU and TopK SAEs.

At the model organism's sizes (notebook 01: d=16, n=32, 50,000 rows full-batch, 5 seeds) a
torch step is five skinny [rows, 16] x [16, 32] matmuls plus a dozen elementwise passes over
[seeds, rows, n] tensors, each a round trip through memory: ~20 ms per step on two cores, so the
authors' 30,000 steps x 2 architectures take 20 minutes. ``fused_step.cpp`` computes the same
gradients and loss sums in one pass over the rows, 16 rows per SIMD vector, with everything in
cache: ~6 ms per step (3x; README, "Benchmarks"). It equals the torch path up to float rounding
(tests/test_fused.py) and its result does not depend on the thread count.

The kernel is compiled on first use for each (d, n, k) with the system C++ compiler (``CXX``,
else ``c++``: the compiler torch.compile already needs on CPU) and ``-march=native``; the shared
library is cached under the store root in ``native/``, keyed by the source, the flags and the
CPU's instruction sets. Without a working compiler, or with ``PAPERLIB_FUSED=0``, or outside its
domain (CPU, fp32 matmuls, d·n <= ``MAX_WEIGHTS``, k <= ``MAX_K``), training uses the torch path;
a failed compilation warns once.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NamedTuple

import torch
from torch import Tensor

from paperlib.store import default_root

if TYPE_CHECKING:
    from paperlib.sae import SAEBank

SOURCE = Path(__file__).with_name("fused_step.cpp")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
MAX_WEIGHTS = 4096  # d·n above this: the per-lane accumulators leave L1/L2 and torch's GEMMs win
MAX_K = 32  # TopK's selection network grows with k


def enabled() -> bool:
    """False when ``PAPERLIB_FUSED`` is ``0``/``false``/``no``/``off``."""
    return os.environ.get("PAPERLIB_FUSED", "1").strip().lower() not in {"0", "false", "no", "off"}


def applies(bank: "SAEBank", x: Tensor) -> bool:
    """Whether ``bank``'s closed-form step on ``x`` can run fused (compilation aside)."""
    cfg = bank.cfg
    return (
        enabled()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and cfg.architecture in ("relu", "topk")
        and cfg.d_model * cfg.n_latents <= MAX_WEIGHTS
        and (cfg.k or 0) <= MAX_K
    )


def fused_grads(
    bank: "SAEBank", x: Tensor, n_rows: int, l1_coeff: float, dims: int
) -> tuple[list[Tensor], Tensor, Tensor] | None:
    """Gradients [W_dec, W_enc, b_enc, b_dec] (b_dec complete), loss sums [3, S] (squared error,
    L1, L0) and the [S, n] mask of latents that fired; None when the kernel does not apply or
    cannot be compiled here (the caller then runs the torch path)."""
    if not applies(bank, x):
        return None
    cfg = bank.cfg
    kernel = _kernel(cfg.d_model, cfg.n_latents, cfg.k or 0)
    if kernel is None:
        return None
    S, d, n = bank.n_seeds, cfg.d_model, cfg.n_latents
    x = x.contiguous()
    weights = [p.detach().contiguous() for p in (bank.W_enc, bank.b_enc, bank.W_dec, bank.b_dec)]
    out = torch.empty(S, kernel.partial_floats)
    kernel.step(
        x.data_ptr(), x.shape[0], S, *(w.data_ptr() for w in weights),
        2.0 / (n_rows * dims), l1_coeff / n_rows, out.data_ptr(), torch.get_num_threads(),
    )
    d_W_dec, d_W_enc, d_b_enc, d_b_dec, sums, fired = out.split([n * d, d * n, n, d, 3, n], dim=1)
    d_b_dec = d_b_dec - torch.bmm(d_b_enc[:, None], weights[0].transpose(1, 2))[:, 0]
    grads = [d_W_dec.reshape(S, n, d), d_W_enc.reshape(S, d, n), d_b_enc.contiguous(), d_b_dec]
    return grads, sums.T.contiguous(), fired > 0


class _Kernel(NamedTuple):
    step: Callable[..., None]
    partial_floats: int  # floats per seed in the output


@functools.cache
def _kernel(d: int, n: int, k: int) -> _Kernel | None:
    """The compiled kernel for one shape, or None (with one warning) when it cannot be built."""
    try:
        library = ctypes.CDLL(str(_build(d, n, k)))
    except subprocess.CalledProcessError as exc:
        _warn_once(f"{' '.join(exc.cmd[:1])} failed: {(exc.stderr or '').strip()[-500:]}")
        return None
    except OSError as exc:  # no compiler, or the library does not load
        _warn_once(f"{type(exc).__name__}: {exc}")
        return None
    step = library.fused_step
    pointer, real = ctypes.c_void_p, ctypes.c_float
    step.argtypes = [pointer, ctypes.c_long, ctypes.c_int, pointer, pointer, pointer, pointer, real, real,
                     pointer, ctypes.c_int]
    step.restype = None
    return _Kernel(step, library.partial_floats())


def _build(d: int, n: int, k: int) -> Path:
    """Compile the kernel for (d, n, k) unless the cache has it; the library is renamed into
    place only once complete, so concurrent or interrupted builds never leave a broken file."""
    compiler = os.environ.get("CXX", "c++")
    defines = (f"-DD={d}", f"-DN={n}", f"-DK={k}")
    key = hashlib.sha256(
        "\n".join([SOURCE.read_text(), compiler, *FLAGS, *defines, _cpu_signature()]).encode()
    ).hexdigest()[:20]
    target = default_root() / "native" / f"fused_step_{d}x{n}_k{k}_{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        base = [compiler, *FLAGS, *defines, str(SOURCE), "-o", str(built)]
        try:
            subprocess.run([*base, "-fopenmp"], check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError:  # no OpenMP (e.g. Apple clang): one thread, still fused
            subprocess.run(base, check=True, capture_output=True, text=True)
        os.replace(built, target)
    return target


@functools.cache
def _cpu_signature() -> str:
    """What ``-march=native`` compiles for: a library built on another CPU may not run here."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


_warned = False


def _warn_once(reason: str) -> None:
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(f"the fused SAE step could not be compiled ({reason}); training uses the slower torch "
                  "path. Install a C++ compiler (or set CXX), or set PAPERLIB_FUSED=0 to silence this")
