"""TopK SAE gradients that touch only the k active latents of each sample.

A dense TopK step costs five [B, d] x [d, n]-sized matmuls (encoder forward, decoder forward,
code gradient, decoder gradient, encoder gradient), although only the encoder forward needs all
n latents: the codes have k non-zeros per sample. Here, per seed,

    pre = (x - b_dec) @ W_enc + b_enc                      the one dense matmul
    (idx, val) = top-k of pre (ReLU'd)                      [B, k]
    x_hat = sum_j val_j W_dec[idx_j] + b_dec                embedding_bag: gathers k decoder rows
    d val_j = <g, W_dec[idx_j]> + l1 / B                    k dot products per sample
    dW_dec[idx_j] += val_j g,  dW_enc[:, idx_j] += d val_j (x - b_dec)    scatter-adds

so everything after the encoder forward is O(B·k·d) instead of O(B·n·d). On CPU that one matmul
goes through oneDNN (``gemm.addmm``: ~2x torch's default MKL call on AMD CPUs). Work is done in
chunks of samples so the [chunk, k, d] gathers stay small; on CPU everything after the top-k
selection runs in one fused C++ kernel instead (``fused.sparse_tail``: no [chunk, k, d]
temporaries at all). The result equals the dense closed form (``SAEBank.loss_and_grads(...,
sparse=False)``) up to float rounding (tested), and ``loss_and_grads`` picks this path
automatically when k is small next to n.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from paperlib.sae.kernels import gemm, scratch
from paperlib.sae.kernels.fused import sparse_tail
from paperlib.sae.kernels.params import Gradients, Params

SPARSE_MIN_LATENTS = 512  # below this the dense path is as fast (and compiles well)
SPARSE_MAX_DENSITY = 1 / 16  # k / n above this: the dense path wins


def sparse_pays_off(k: int, n_latents: int) -> bool:
    return n_latents >= SPARSE_MIN_LATENTS and k <= SPARSE_MAX_DENSITY * n_latents


@torch.no_grad()
def sparse_topk_grads(
    params: Params, x: Tensor, k: int, n_rows: int, l1_coeff: float, dims: int, chunk_size: int = 256
) -> Gradients:
    """The closed-form step of a TopK SAE on batch ``x``, touching only the k active latents per row."""
    n_seeds, n = params.b_enc.shape
    grads = [
        torch.zeros_like(params.W_dec),
        torch.empty_like(params.W_enc),  # W_enc's and b_dec's: set per seed below (empty_like keeps W_enc's layout)
        torch.zeros_like(params.b_enc),
        torch.empty_like(params.b_dec),
    ]
    sums = torch.zeros(3, n_seeds, device=x.device)
    fired = torch.zeros(n_seeds, n, dtype=torch.bool, device=x.device)
    scale = 2.0 / (n_rows * dims)
    kept = gemm.writes_into(x, params.W_enc[0], params.b_enc[0])  # every seed's product takes the same route
    out = scratch.buffer("sparse_topk_pre", (x.shape[0], n), torch.float32, x.device) if kept else None
    for s in range(n_seeds):
        W_dec, W_enc, b_dec = params.W_dec[s], params.W_enc[s], params.b_dec[s]
        # W_enc's gradient, transposed, is summed in place where the bank keeps W_enc latent-major (it does)
        in_place = grads[1][s].T.is_contiguous()
        d_W_enc_t = grads[1][s].T.zero_() if in_place else torch.zeros(n, x.shape[1], device=x.device)
        d_W_dec, centred = grads[0][s], x - b_dec
        pre = gemm.addmm(params.b_enc[s], centred, W_enc, out=out).float()  # fp32 also when autocast made it bf16
        top = pre.topk(k, dim=-1, sorted=False)
        idx, val = top.indices, top.values.relu()  # a non-positive pre-activation does not fire
        active = val > 0
        tail = sparse_tail(x, b_dec, W_dec, W_enc, idx, val, scale, l1_coeff / n_rows, d_W_dec, d_W_enc_t, grads[2][s])
        if tail is not None:  # on CPU: the same sums in C++, each in a fixed order (fused.py)
            grads[3][s], sums[:, s] = tail
        else:
            g, d_val, sq_err = _torch_tail(
                x,
                centred,
                b_dec,
                W_dec,
                idx,
                val,
                active,
                scale,
                l1_coeff / n_rows,
                d_W_dec,
                d_W_enc_t,
                chunk_size,
            )
            grads[2][s].index_add_(0, idx.flatten(), d_val.flatten())
            grads[3][s] = g.sum(0) - W_enc @ grads[2][s]
            sums[:, s] = torch.stack([sq_err, val.sum(), active.sum().to(val.dtype)])
        if not in_place:
            grads[1][s] = d_W_enc_t.T
        fired[s, idx[active]] = True
    return Gradients(Params(*grads), sums, fired)


def _torch_tail(
    x: Tensor,
    centred: Tensor,
    b_dec: Tensor,
    W_dec: Tensor,
    idx: Tensor,
    val: Tensor,
    active: Tensor,
    scale: float,
    l1_per_row: float,
    d_W_dec: Tensor,
    d_W_enc_t: Tensor,
    chunk_size: int,
):
    """The step after the top-k selection in torch ops (what ``fused.sparse_tail`` computes): adds
    into ``d_W_dec`` and ``d_W_enc_t``; returns g, the active codes' gradients and the squared error."""
    err = F.embedding_bag(idx, W_dec, per_sample_weights=val, mode="sum") + b_dec - x
    g = err * scale
    d_val = torch.empty_like(val)
    for start in range(0, x.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        chosen = W_dec[idx[rows]]  # [c, k, d]
        d_val[rows] = torch.bmm(chosen, g[rows, :, None])[..., 0]
        d_W_dec.index_add_(0, idx[rows].flatten(), (val[rows, :, None] * g[rows, None, :]).flatten(0, 1))
    d_val = (d_val + l1_per_row) * active
    for start in range(0, x.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        d_W_enc_t.index_add_(0, idx[rows].flatten(), (d_val[rows, :, None] * centred[rows, None, :]).flatten(0, 1))
    return g, d_val, err.square().sum()
