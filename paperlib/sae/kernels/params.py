"""What every kernel of the closed-form step takes and gives: plain tensors, never an ``SAEBank``."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class Params(NamedTuple):
    """A bank's weights (or their gradients), stacked over seeds in the bank's layout."""

    W_dec: Tensor  # [S, n, d]
    W_enc: Tensor  # [S, d, n]
    b_enc: Tensor  # [S, n]
    b_dec: Tensor  # [S, d]


class Gradients(NamedTuple):
    """One closed-form step: the gradients (b_dec's complete), the loss sums [3, S] (squared error,
    L1, L0, each summed over the batch) and the [S, n] mask of latents that fired."""

    grads: Params
    sums: Tensor
    fired: Tensor
