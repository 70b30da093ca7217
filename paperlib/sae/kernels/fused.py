"""Fused C++ kernels for the CPU training step of ReLU and TopK SAEs, where torch ops are memory-bound.

``fused_step.cpp`` (``fused_grads``): the whole closed-form step of *small* SAEs. At the model
organism's sizes (notebook 01: d=16, n=32, 50,000 rows full-batch, 5 seeds) a torch step is five
skinny [rows, 16] x [16, 32] matmuls plus a dozen elementwise passes over [seeds, rows, n] tensors,
each a round trip through memory: ~20 ms per step on two cores. The kernel does it in one pass over
the rows, 16 rows per SIMD vector, with everything in cache: ~6 ms (3x; README, "Benchmarks").

``fused_sparse.cpp`` (``sparse_tail``): the part of the *sparse* TopK step (``sparse_topk.py``,
LLM-sized SAEs) after the encoder matmul and the top-k selection. In torch it materialises the k
gathered decoder rows and the k outer products of every row ([B, k, d] tensors) for index_add_;
the kernel reads each active row once per use and adds into the gradients directly: 7x faster for
that part at d=576, n=4096, k=32, batch 4096.

Both equal the torch paths up to float rounding (tests/test_fused.py), and their results do not
depend on the thread count. They are compiled on first use (``fused_step`` once per (d, n, k)) with
the system C++ compiler (``CXX``, else ``c++``: the compiler torch.compile already needs on CPU) and
``-march=native``; the libraries are cached under the store root in ``native/``, keyed by the
source, the flags and the CPU's instruction sets. Without a working compiler, or with
``PAPERLIB_FUSED=0``, or outside their domain (CPU, fp32; for ``fused_step`` also no bf16 autocast,
d·n <= ``MAX_WEIGHTS``, k <= ``MAX_K``), training uses the torch paths; a failed compilation warns once.

Each kernel runs at the thread count measured fastest (``paperlib.sae.threads``): since its results do
not depend on the thread count, switching never changes a number.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile
import warnings
from pathlib import Path
import torch
from torch import Tensor

from paperlib._stack import user_stacklevel
from paperlib.runtime import cpu_signature
from paperlib.sae.kernels.params import Gradients, Params
from paperlib.sae.threads import kernel_chooser
from paperlib.store import default_root

FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
MAX_WEIGHTS = 4096  # d·n above this: the per-lane accumulators leave L1/L2 and torch's GEMMs win
MAX_K = 32  # TopK's selection network grows with k


def enabled() -> bool:
    """False when ``PAPERLIB_FUSED`` is ``0``/``false``/``no``/``off``."""
    return os.environ.get("PAPERLIB_FUSED", "1").strip().lower() not in {"0", "false", "no", "off"}


def applies(x: Tensor, architecture: str, d_model: int, n_latents: int, k: int | None) -> bool:
    """Whether the closed-form step of this SAE shape on ``x`` can run fused (compilation aside)."""
    return (
        enabled()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and architecture in ("relu", "topk")
        and d_model * n_latents <= MAX_WEIGHTS
        and (k or 0) <= MAX_K
    )


def fused_grads(params: Params, x: Tensor, k: int | None, n_rows: int, l1_coeff: float, dims: int) -> Gradients | None:
    """The closed-form step of a ReLU (``k`` None) or TopK SAE, fused; None when the kernel cannot be
    compiled here (the caller then runs the torch path). The caller checks ``applies`` first."""
    S, d, n = params.W_enc.shape
    library = _library("fused_step", d=d, n=n, k=k or 0)
    if library is None:
        return None
    x = x.contiguous()
    weights = [p.detach().contiguous() for p in (params.W_enc, params.b_enc, params.W_dec, params.b_dec)]
    out = torch.empty(S, library.partial_floats())
    kernel_chooser(f"fused_step_{S}_{d}_{n}_{k or 0}_{x.shape[0]}").run(
        lambda threads: library.fused_step(
            _ptr(x),
            ctypes.c_long(x.shape[0]),
            S,
            *map(_ptr, weights),
            ctypes.c_float(2.0 / (n_rows * dims)),
            ctypes.c_float(l1_coeff / n_rows),
            _ptr(out),
            threads,
        )
    )
    d_W_dec, d_W_enc, d_b_enc, d_b_dec, sums, fired = out.split([n * d, d * n, n, d, 3, n], dim=1)
    d_b_dec = d_b_dec - torch.bmm(d_b_enc[:, None], weights[0].transpose(1, 2))[:, 0]
    grads = Params(d_W_dec.reshape(S, n, d), d_W_enc.reshape(S, d, n), d_b_enc.contiguous(), d_b_dec)
    return Gradients(grads, sums.T.contiguous(), fired > 0)


def sparse_tail(
    x: Tensor,
    b_dec: Tensor,
    W_dec: Tensor,
    W_enc: Tensor,
    idx: Tensor,
    val: Tensor,
    err_scale: float,
    l1_per_row: float,
    d_W_dec: Tensor,
    d_W_enc_t: Tensor,
    d_b_enc: Tensor,
) -> tuple[Tensor, Tensor] | None:
    """One seed of ``sparse_topk``'s step after the top-k selection, fused (``fused_sparse.cpp``):
    adds into the gradients ``d_W_dec`` and ``d_W_enc_t`` (W_enc transposed), both [n, d], and
    ``d_b_enc`` [n]; returns b_dec's complete gradient [d] and the loss sums [3] (squared error, L1,
    L0), every sum in a fixed order, so the result does not depend on the thread count. None, touching nothing,
    when it does not apply or cannot be compiled (the caller then runs the torch version)."""
    tensors = (x, b_dec, W_dec, W_enc, val, d_W_dec, d_W_enc_t, d_b_enc)
    if (
        not enabled()
        or any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors)
        or not all(t.is_contiguous() for t in (d_W_dec, d_W_enc_t, d_b_enc))
    ):
        return None
    library = _library("fused_sparse")
    if library is None:
        return None
    (rows, d), (n, k) = x.shape, (W_dec.shape[0], idx.shape[1])
    x, b_dec, W_dec, val = (t.detach().contiguous() for t in (x, b_dec, W_dec, val))
    W_enc_t = W_enc.detach().T.contiguous()  # a bank's W_enc is stored latent-major: no copy
    idx = idx.to(torch.int64).contiguous()
    g, d_val, sq_err = torch.empty(rows, d), torch.empty(rows, k), torch.empty(rows)
    d_b_dec, sums = torch.empty(d), torch.empty(3, dtype=torch.float64)
    kernel_chooser(f"sparse_tail_{rows}_{d}_{n}_{k}").run(
        lambda threads: library.sparse_tail(
            _ptr(x),
            _ptr(b_dec),
            _ptr(W_dec),
            _ptr(W_enc_t),
            _ptr(idx),
            _ptr(val),
            ctypes.c_long(rows),
            d,
            k,
            ctypes.c_long(n),
            ctypes.c_float(err_scale),
            ctypes.c_float(l1_per_row),
            _ptr(g),
            _ptr(d_val),
            _ptr(sq_err),
            _ptr(d_W_dec),
            _ptr(d_W_enc_t),
            _ptr(d_b_enc),
            _ptr(d_b_dec),
            _ptr(sums),
            threads,
        )
    )
    return d_b_dec, sums.float()


def _ptr(t: Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


@functools.cache
def _library(source: str, **defines: int) -> ctypes.CDLL | None:
    """``<source>.cpp`` compiled with ``-D<NAME>=<value>`` for each define, or None (with one warning)
    when it cannot be built here."""
    try:
        return ctypes.CDLL(str(_build(source, defines)))
    except subprocess.CalledProcessError as exc:
        _warn_once(f"{' '.join(exc.cmd[:1])} failed: {(exc.stderr or '').strip()[-500:]}")
    except OSError as exc:  # no compiler, or the library does not load
        _warn_once(f"{type(exc).__name__}: {exc}")
    return None


def _build(source: str, defines: dict[str, int]) -> Path:
    """Compile ``<source>.cpp`` unless the cache has it; the library is renamed into place only
    once complete, so concurrent or interrupted builds never leave a broken file."""
    path = Path(__file__).with_name(f"{source}.cpp")
    compiler = os.environ.get("CXX", "c++")
    flags = [*FLAGS, *(f"-D{name.upper()}={value}" for name, value in sorted(defines.items()))]
    key = hashlib.sha256("\n".join([path.read_text(), compiler, *flags, cpu_signature()]).encode()).hexdigest()[:20]
    shape = "_".join(f"{name}{value}" for name, value in sorted(defines.items()))
    target = default_root() / "native" / f"{source}_{shape + '_' if shape else ''}{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        base = [compiler, *flags, str(path), "-o", str(built)]
        try:
            subprocess.run([*base, "-fopenmp"], check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError:  # no OpenMP (e.g. Apple clang): one thread, still fused
            subprocess.run(base, check=True, capture_output=True, text=True)
        os.replace(built, target)
    return target


_warned = False


def _warn_once(reason: str) -> None:
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(
        f"a fused SAE kernel could not be compiled ({reason}); training uses the slower torch "
        "ops. Install a C++ compiler (or set CXX), or set PAPERLIB_FUSED=0 to silence this",
        stacklevel=user_stacklevel(),
    )
