"""Canonical JSON: the one byte string of a JSON value that every party signs and hashes
(protocol-v3.md §7.1). Keys sorted, no whitespace, UTF-8, numbers as integers only.

Keys are sorted by their UTF-16 code units, the order of JavaScript's default sort, so a
browser or node agent that sorts its keys signs the same bytes. Floats are refused
rather than formatted: two languages print ``0.1`` or ``1e21`` differently, and a
signature over a number one side spells differently is a signature nobody can check.
"""

from __future__ import annotations

import json
from typing import Any


class CanonicalError(ValueError):
    """A value with no canonical form (a float, a non-string key, a set, ...)."""


def _utf16(key: str) -> bytes:
    return key.encode("utf-16-be", "surrogatepass")


def _normal(value: Any, depth: int) -> Any:
    if depth > 32:
        raise CanonicalError("nested deeper than 32")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)  # an IntEnum prints as its number
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise CanonicalError("object keys must be strings")
        # ASCII keys sort alike by code point and by UTF-16 code unit: no key encoded
        ascii = all(k.isascii() for k in value)
        order = sorted(value) if ascii else sorted(value, key=_utf16)
        return {k: _normal(value[k], depth + 1) for k in order}
    if isinstance(value, (list, tuple)):
        return [_normal(v, depth + 1) for v in value]
    if isinstance(value, float):
        raise CanonicalError(f"{value!r} is not an integer: canonical JSON has integers only")
    raise CanonicalError(f"a {type(value).__name__} is not JSON")


def canonical(obj: Any) -> bytes:
    """The canonical JSON bytes of ``obj``; ``CanonicalError`` if it has none."""
    try:
        text = json.dumps(_normal(obj, 0), separators=(",", ":"), ensure_ascii=False)
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise CanonicalError("a string holds a lone surrogate (not UTF-8)") from None
