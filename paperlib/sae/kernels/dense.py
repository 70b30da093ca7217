"""The closed-form step in plain torch ops: every architecture with a per-sample mask, any device.

Per chunk of rows (cache-sized), for every seed at once (batched matmuls over the seed axis):

    pre = (x - b_dec) @ W_enc + b_enc,   codes = relu(pre) * mask(pre),   err = codes @ W_dec + b_dec - x
    g = err · 2 / (rows · dims),         d codes = (g W_decᵀ + l1 / rows) * mask

and the gradients are the matching outer products. b_dec enters twice, through the decoder and
through ``x - b_dec``; the second part, -(Σ d pre) W_encᵀ, is added once after the last chunk.
"""

from __future__ import annotations

import torch
from torch import Tensor

from paperlib.runtime import maybe_compile
from paperlib.sae.architectures import Architecture
from paperlib.sae.kernels.params import Gradients, Params


def dense_grads(
    params: Params,
    x: Tensor,
    arch: type[Architecture],
    k: int,
    n_rows: int,
    l1_coeff: float,
    dims: int,
    chunk_size: int,
) -> Gradients:
    """The closed-form gradients of ``arch`` (its ``mask`` with ``k``; ReLU ignores it) over ``x``."""
    grads = [torch.zeros_like(p) for p in params]
    n_seeds, n_latents = params.b_enc.shape
    sums = torch.zeros(3, n_seeds, device=x.device)
    fired = torch.zeros(n_seeds, n_latents, dtype=torch.bool, device=x.device)
    # 0-d tensors, not floats: a compiled graph specialises on Python floats and would recompile
    # for every new L1 coefficient (sparsity warm-up, L1 calibration) or batch size.
    err_scale = torch.tensor(2.0 / (n_rows * dims), device=x.device)
    l1_per_row = torch.tensor(l1_coeff / n_rows, device=x.device)
    for start in range(0, x.shape[0], chunk_size):
        *chunk, chunk_fired = _masked_chunk_grads(
            x[start : start + chunk_size], *params, arch, k, err_scale, l1_per_row
        )
        for acc, part in zip(grads + [sums], chunk):
            acc += part
        fired |= chunk_fired
    # The pre-encoder bias enters through x - b_dec: d/d b_dec gets -(sum dpre) W_enc^T.
    grads[3] -= torch.bmm(grads[2][:, None], params.W_enc.transpose(1, 2))[:, 0]
    return Gradients(Params(*grads), sums, fired)


@maybe_compile
def _masked_chunk_grads(
    x: Tensor,
    W_dec: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    arch: type[Architecture],
    k: int,
    err_scale: Tensor,
    l1_per_row: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One chunk's contribution to the gradients (b_dec only through the decoder), the loss sums
    and which latents fired. ``err_scale`` = 2 / (rows · dims averaged over), ``l1_per_row`` =
    L1 coefficient / rows."""
    centred = x - b_dec[:, None]
    pre = torch.baddbmm(b_enc[:, None], centred, W_enc)
    active = arch.mask(pre, k)
    mask = active.to(pre.dtype)
    codes = pre.relu() * mask
    err = torch.baddbmm(b_dec[:, None], codes, W_dec) - x
    g = err * err_scale
    d_codes = (torch.bmm(g, W_dec.transpose(1, 2)) + l1_per_row) * mask
    sums = torch.stack([err.square().sum((1, 2)), codes.sum((1, 2)), mask.sum((1, 2))])
    return (
        torch.bmm(codes.transpose(1, 2), g),
        torch.bmm(centred.transpose(1, 2), d_codes),
        d_codes.sum(1),
        g.sum(1),
        sums,
        active.any(1),
    )
