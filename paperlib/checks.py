"""Type checks for configuration values, where Python's number types make mistakes easy.

``True`` is an ``int`` in Python and a string compares with nothing, so a config field given the
wrong type would otherwise pass a range check or fail deep inside training. Every config class
checks its fields with these before comparing them.
"""

from __future__ import annotations

import math
import numbers
from typing import Any


def is_int(value: Any, low: int | None = None) -> bool:
    """An integer that is not a bool (never a meant count), and ``>= low`` when given."""
    return isinstance(value, int) and not isinstance(value, bool) and (low is None or value >= low)


def is_real(value: Any, finite: bool = True) -> bool:
    """A real number that is not a bool (numpy scalars included), and finite unless ``finite=False``."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and (not finite or math.isfinite(value))
