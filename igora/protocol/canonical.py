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


PLAIN = (str, int, bool, type(None))
"""Types that stand for themselves in JSON (exactly these: not an IntEnum, not a str
subclass), which ``_normal`` passes without a call of its own (it runs on every header,
receipt and ledger entry), as ``igora.v3.signed.plain`` does."""


def _normal(value: Any, depth: int) -> Any:
    if depth > 32:
        raise CanonicalError("nested deeper than 32")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)  # an IntEnum prints as its number
    if isinstance(value, dict):
        if value and depth == 32:  # its values would be deeper
            raise CanonicalError("nested deeper than 32")
        ascii_only = True
        for k in value:
            if not isinstance(k, str):
                raise CanonicalError("object keys must be strings")
            ascii_only = ascii_only and k.isascii()
        # ASCII keys sort the same by code point as by UTF-16 code unit
        keys = sorted(value) if ascii_only else sorted(value, key=_utf16)
        out = {}
        for k in keys:
            v = value[k]
            out[k] = v if type(v) in PLAIN else _normal(v, depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        if value and depth == 32:
            raise CanonicalError("nested deeper than 32")
        return [v if type(v) in PLAIN else _normal(v, depth + 1) for v in value]
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
