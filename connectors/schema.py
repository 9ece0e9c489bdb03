"""Strict checks of values decoded from a peer (exact keys, types, ranges), and the error they raise.

Everything a peer sends is untrusted: a value is checked here before anything reads it, and a malformed
one raises ``HandshakeError`` (never ``KeyError``/``TypeError``/...), with a bounded message.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from kvlayout.errors import KVLayoutError

MAX_NAME = 256                       # bound on every string a peer sends
MAX_U64 = (1 << 64) - 1


class HandshakeError(KVLayoutError):
    """A handshake failed: malformed or oversized message, or incompatible engines (``fields`` names them)."""

    def __init__(self, message: str, fields: Sequence[str] = ()):
        super().__init__(message)
        self.fields = tuple(fields)


def malformed(where: str, what: str) -> HandshakeError:
    """The error for a malformed message: ``where`` is the path of the bad value."""
    return HandshakeError(f"malformed handshake message: {where}: {what}")


def exact_keys(obj: Any, required: Sequence[str], where: str) -> dict:
    """``obj`` itself, if it is a map with exactly the keys ``required``."""
    if not isinstance(obj, dict):
        raise malformed(where, f"expected a map, got {type(obj).__name__}")
    keys = set(obj)
    if keys != set(required):
        missing, extra = sorted(set(required) - keys), sorted(map(str, keys - set(required)))
        raise malformed(where, (f"missing {missing}" if missing else "") + (" " if missing and extra else "")
                        + (f"unexpected {extra[:8]}" if extra else ""))
    return obj


def integer(v: Any, where: str, lo: int = 0, hi: int = MAX_U64) -> int:
    """An int (not a bool) in ``[lo, hi]``."""
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise malformed(where, f"expected an integer in [{lo}, {hi}], got {v!r}"[:200])
    return v


def optional_integer(v: Any, where: str, lo: int = 1, hi: int = MAX_U64) -> Optional[int]:
    """None, or an int in ``[lo, hi]``."""
    return None if v is None else integer(v, where, lo, hi)


def string(v: Any, where: str, choices: Optional[Sequence[str]] = None) -> str:
    """A string of 1..``MAX_NAME`` characters, one of ``choices`` when given."""
    if not isinstance(v, str) or not 0 < len(v) <= MAX_NAME:
        raise malformed(where, f"expected a string of 1..{MAX_NAME} characters, got {type(v).__name__}")
    if choices is not None and v not in choices:
        raise malformed(where, f"expected one of {list(choices)}, got {v!r}")
    return v


def boolean(v: Any, where: str) -> bool:
    """A bool."""
    if not isinstance(v, bool):
        raise malformed(where, f"expected a boolean, got {type(v).__name__}")
    return v


def bounded_list(v: Any, where: str, max_len: int) -> list:
    """A list of at most ``max_len`` items (the items are the caller's to check)."""
    if not isinstance(v, list) or len(v) > max_len:
        raise malformed(where, f"expected a list of at most {max_len} items, got {type(v).__name__}")
    return v
