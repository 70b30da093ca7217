"""The one place that decides which kernel computes a closed-form step (ReLU, TopK without AuxK).

Three kernels give the same numbers up to float rounding (tests/test_sae.py, test_fused.py):

* ``"sparse"`` (``sparse_topk.py``): TopK with k small next to n; only the encoder forward is dense,
  everything after it touches the k active latents of each row (on CPU through ``fused.sparse_tail``);
* ``"fused"`` (``fused.py``): small ReLU and TopK SAEs on CPU in fp32, the whole step in one C++ pass;
* ``"dense"`` (``dense.py``): masked torch ops, every other case and device.

The kernels are functions of tensors (``Params``) and shapes; only this module reads an ``SAEConfig``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from torch import Tensor

from paperlib.sae.kernels import fused
from paperlib.sae.kernels.dense import dense_grads
from paperlib.sae.kernels.params import Gradients, Params
from paperlib.sae.kernels.sparse_topk import sparse_pays_off, sparse_topk_grads

if TYPE_CHECKING:
    from paperlib.sae.bank import SAEConfig

Kernel = Literal["sparse", "fused", "dense"]


def kernel_for(cfg: SAEConfig, x: Tensor, sparse: bool | None = None) -> Kernel:
    """The kernel of ``cfg``'s closed-form step on ``x``; ``sparse`` forces TopK's sparse path on or
    off (default: on when k is small next to n)."""
    k = cfg.k
    if sparse is None:
        sparse = cfg.architecture == "topk" and k is not None and sparse_pays_off(k, cfg.n_latents)
    if sparse:
        if cfg.architecture != "topk":
            raise ValueError(f"the sparse path is for TopK SAEs, not {cfg.architecture}")
        return "sparse"
    return "fused" if fused.applies(x, cfg.architecture, cfg.d_model, cfg.n_latents, k) else "dense"


def closed_form_grads(
    cfg: SAEConfig,
    params: Params,
    x: Tensor,
    *,
    n_rows: int,
    l1_coeff: float,
    chunk_size: int,
    sparse: bool | None = None,
) -> Gradients:
    """The step's gradients, loss sums and fired latents over batch ``x`` of ``n_rows`` rows, by the
    kernel ``kernel_for`` picks (the torch one when the fused kernel cannot be compiled here)."""
    dims = x.shape[1] if cfg.reconstruction == "mean" else 1
    kernel = kernel_for(cfg, x, sparse)
    if kernel == "sparse":
        assert cfg.k is not None  # kernel_for gives "sparse" only to TopK, which requires k
        return sparse_topk_grads(params, x, cfg.k, n_rows, l1_coeff, dims)
    found = fused.fused_grads(params, x, cfg.k, n_rows, l1_coeff, dims) if kernel == "fused" else None
    return (
        found if found is not None else dense_grads(params, x, cfg.arch, cfg.k or 0, n_rows, l1_coeff, dims, chunk_size)
    )
