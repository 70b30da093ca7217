"""``warnings.warn(..., stacklevel=user_stacklevel())`` for warnings raised at varying depths inside paperlib.

A fixed ``stacklevel`` names the right frame only when there is one way to reach the warning. The cache,
model and kernel warnings are reached from many entry points (``Store.load`` through ``Store.cached`` from
every cached computation, the fused kernels from ``train`` or ``SAEBank.loss_and_grads``), so they name the
first frame outside this package instead: the user's call, wherever it came from. Frames of the wrappers
paperlib's functions run under (``torch.no_grad``, ``torch.compile``, ``contextlib.contextmanager``) are
passed over too: they sit between paperlib's frames and the user's.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch

_INTERNAL = tuple(os.path.dirname(os.path.abspath(path)) + os.sep for path in (__file__, torch.__file__))  # packages
_WRAPPERS = (contextlib.__file__,)  # a single module


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning raised by the calling function name the first frame
    outside paperlib and its wrappers (the outermost frame when there is none)."""
    frame = sys._getframe(1)  # the function that warns: stacklevel 1
    level = 1
    while frame.f_back is not None and (
        frame.f_code.co_filename.startswith(_INTERNAL) or frame.f_code.co_filename in _WRAPPERS
    ):
        frame = frame.f_back
        level += 1
    return level
