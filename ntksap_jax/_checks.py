"""Argument checks and pytree predicates shared by the modules (private).

Every check raises ``ValueError`` with one line naming the argument, the bad value and what is
allowed, and returns the value normalised (``int``/``float``); ``bool`` is never a number here.

Example::

    n = positive_int(num_inputs, "num_inputs")   # 100, or ValueError: num_inputs must be ...
"""

from __future__ import annotations

import math
import operator

__all__ = ["is_none", "positive_int", "non_negative_int", "positive_float"]


def is_none(x) -> bool:
    """``is_leaf`` for mask pytrees, whose dense (never pruned) leaves are ``None``."""
    return x is None


def _as_int(value):
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def positive_int(value, name: str) -> int:
    """``int(value)``, or ``ValueError`` unless it is an integer >= 1 (``bool`` is refused)."""
    n = _as_int(value)
    if n is None or n < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    return int(n)


def non_negative_int(value, name: str) -> int:
    """``int(value)``, or ``ValueError`` unless it is an integer >= 0 (``bool`` is refused)."""
    n = _as_int(value)
    if n is None or n < 0:
        raise ValueError(f"{name} must be a non-negative integer; got {value!r}")
    return int(n)


def positive_float(value, name: str) -> float:
    """``float(value)``, or ``ValueError`` unless it is a finite real number > 0 (``bool`` and
    strings are refused)."""
    try:
        v = math.nan if isinstance(value, (bool, str, bytes)) else float(value)
    except (TypeError, ValueError):
        v = math.nan
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a positive finite number; got {value!r}")
    return v
