"""Checks of plain argument values (counts, sizes), shared by every module that takes them."""

from __future__ import annotations

import numbers

from .errors import KVLayoutError


def require_int(value, what: str, minimum: int = 0) -> int:
    """``value`` as an ``int`` if it is an integer (a numpy integer too, never a bool) ``>= minimum``;
    otherwise a ``KVLayoutError`` naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise KVLayoutError(f"{what} must be {kind}, got {value!r}")
    return int(value)
