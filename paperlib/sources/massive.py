"""Massive activations: the rare LLM activation rows whose norm dwarfs the rest, left out of training.

Shared by training on cached rows (``runs.trained.activation_run``: relative to the median of all training rows)
and on a stream (``sources.stream.RowStream``: relative to the median of each block).
"""

from __future__ import annotations

import warnings

from torch import Tensor

from paperlib._stack import user_stacklevel
from paperlib.checks import is_real

MASSIVE_NORM_FACTOR = 10.0


def checked_norm_factor(factor: float | None) -> float | None:
    if factor is not None and (not is_real(factor, finite=True) or factor <= 1):
        raise ValueError(
            f"max_norm_factor must be a number > 1 (a multiple of the median row norm) or None to keep "
            f"every row, got {factor!r}"
        )
    return factor


def without_massive_rows(x: Tensor, *, factor: float | None = MASSIVE_NORM_FACTOR) -> Tensor:
    """``x`` without the rows whose L2 norm exceeds ``factor`` x the median row norm; ``None`` keeps all.

    Why: a few LLM activation rows are "massive" (SmolLM2 block 19 on the whole packaged corpus: 4 of
    1.02M rows above 10x the median norm, the largest 90x, i.e. ~8000x a typical row's energy; typical
    rows stay within 1.3x). One such row in a batch dominates the squared error, and at notebook 06's
    learning rate the kick left 22 % of a TopK SAE's latents dead for good (PW-MCC 0.53 instead of 0.70,
    FVU 0.239 instead of 0.204; measured, README). The default's 255k rows have none above 7.6x."""
    if checked_norm_factor(factor) is None:
        return x
    norms = x.norm(dim=1)
    keep = norms <= factor * norms.median()
    if not keep.all():
        warnings.warn(
            f"left out {int((~keep).sum())} of {len(x)} training rows whose norm exceeds {factor:g}x the "
            f"median ({float(norms.median()):.4g}); largest {float(norms.max()):.4g} (massive activations; "
            "max_norm_factor=None keeps them)",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )
    return x[keep]
