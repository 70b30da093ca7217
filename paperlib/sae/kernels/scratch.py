"""Scratch tensors that the steps of one training run reuse, where a fresh allocation costs more than its use.

The sparse TopK step writes its encoder pre-activations, a [batch, n] float32 tensor (268 MB at batch 4,096
and n = 16,384), once per seed and step, and reads them once for the top-k selection; a unit-norm decoder's
gradient projection makes two [S, n, d] products. Allocations that large come straight from the operating
system as new pages, and the first write to each page faults: on a 2-core Intel Xeon (Sapphire Rapids) the
[4,096 x 768] x [768 x 16,384] product took ~376 ms into a fresh tensor and ~334 ms into a kept one, and the
whole TopK step at that size went from 0.66-0.73 s to 0.56-0.61 s (2026-12-06). So ``train()`` runs its steps
inside ``reuse()``, and a step asks ``buffer(...)`` for such a tensor: the same one every step while a run is
active, None outside one (the caller then allocates as usual, so nothing is kept between runs).

Only for temporaries that are completely overwritten and not handed back: what a step returns (its gradients)
is allocated fresh, since callers and ``threads.MeasuredStep``'s probes hold on to it.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
from torch import Tensor

_buffers: contextvars.ContextVar[dict[tuple, Tensor] | None] = contextvars.ContextVar("scratch", default=None)


@contextlib.contextmanager
def reuse() -> Iterator[None]:
    """Inside the block, ``buffer`` hands out kept tensors; they are released when it ends."""
    token = _buffers.set({})
    try:
        yield
    finally:
        _buffers.reset(token)


def buffer(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor | None:
    """The kept tensor ``name`` of this shape, dtype and device (contents undefined), or None outside ``reuse``."""
    kept = _buffers.get()
    if kept is None:
        return None
    key = (name, tuple(shape), dtype, torch.device(device))
    if key not in kept:
        kept[key] = torch.empty(shape, dtype=dtype, device=device)
    return kept[key]
