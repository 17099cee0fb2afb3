"""Signed JSON objects of protocol 3: a worker's advert now, a task's header and receipts
later (docs/protocol-v3.md §6, §7.1).

An object is signed over its **canonical JSON** (``canonical``: igora.protocol.canonical's,
which has integers only: a fraction travels as a decimal string) without its ``sig``
field, prefixed with a label saying what it is, so that no signature serves two purposes
(``igora.identity``). ``sig`` is the unpadded base64url of the 64-byte signature.
"""

from __future__ import annotations

import math
from typing import Any

from ..identity import BadSignature, Identity, IdentityError, b64url, unb64url, verify
from ..protocol.canonical import PLAIN, CanonicalError
from ..protocol.canonical import canonical as protocol_canonical

ADVERT = b"igora3-advert"
"""The label of a worker's advert."""


class SignatureError(ValueError):
    """A signed object whose signature is missing, malformed or wrong."""


def plain(value: Any) -> Any:
    """``value`` with every integral float as an int (1.0 -> 1), and no NaN/Infinity: as
    signed, after a trip through a Yjs map (which keeps every number as a float)."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise SignatureError("a signed object holds no NaN or Infinity")
        return int(value) if value.is_integer() else value
    if isinstance(value, dict):
        return {k: v if type(v) in PLAIN else plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [v if type(v) in PLAIN else plain(v) for v in value]
    return value


def canonical(body: dict[str, Any]) -> bytes:
    """The canonical JSON of an object (``igora.protocol.canonical``), without its
    ``sig``, its integral floats read back as integers."""
    unsigned = {k: v for k, v in body.items() if k != "sig"}
    try:
        return protocol_canonical(plain(unsigned))
    except CanonicalError as exc:
        raise SignatureError(str(exc)) from None


def sign(identity: Identity, label: bytes, body: dict[str, Any]) -> dict[str, Any]:
    """``body`` with its ``sig`` by ``identity``."""
    return {**body, "sig": b64url(identity.sign(label + canonical(body)))}


def check(id_: str, label: bytes, body: dict[str, Any]) -> None:
    """``SignatureError`` unless ``body["sig"]`` is ``id_``'s signature of ``body``."""
    sig = body.get("sig")
    if not isinstance(sig, str):
        raise SignatureError('no "sig"')
    try:
        verify(id_, label + canonical(body), unb64url(sig, 64, "sig"))
    except (IdentityError, BadSignature) as exc:
        raise SignatureError(str(exc)) from None
