"""A v3 task header, signed by its asker (protocol-v3.md §7.1), and its hash.

``sig`` is the asker's Ed25519 signature over ``"igora3-header" ‖ canonical JSON of every
other field``; the header's hash (``header`` in a receipt, ``H(header)`` in a grant) is
BLAKE2b-256 of the canonical JSON of the whole signed header, ``sig`` included, in
unpadded base64url. Only the fields that credits and grants rely on are checked here
(``id``, ``asker``, ``model``, ``maxPrice``, ``v``); the rest is the reader's (§7.4).
"""

from __future__ import annotations

import hashlib
from typing import Any

from ..identity import BadSignature, Identity, IdentityError, b64url, unb64url, verify
from ..protocol import CanonicalError, canonical
from .documents import TASK_ID
from .signed import SignatureError, plain

LABEL = b"igora3-header"
VERSION = 3


class HeaderError(ValueError):
    """A header that is malformed or not signed by the asker it names."""


def _unsigned(header: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in header.items() if k != "sig"}


def _canonical(value: dict[str, Any], plained: bool = False) -> bytes:
    """The canonical JSON of ``value``, read as signed (``plain``) first unless
    ``plained`` says it is."""
    try:
        return canonical(value if plained else plain(value))
    except (CanonicalError, SignatureError) as exc:
        raise HeaderError(f"header: {exc}") from None


def _message(fields: dict[str, Any]) -> bytes:
    return LABEL + _canonical(fields)


def _hash(data: bytes) -> str:
    return b64url(hashlib.blake2b(data, digest_size=32).digest())


def sign_header(identity: Identity, fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` (``asker`` set to ``identity``'s id, ``v`` to 3) with their signature."""
    header = {**_unsigned(fields), "asker": identity.id, "v": VERSION}
    check_fields(header)
    return {**header, "sig": b64url(identity.sign(_message(header)))}


def check_fields(header: dict[str, Any]) -> None:
    """The fields credits rely on have their types; HeaderError naming the first that
    does not."""
    if not isinstance(header, dict):
        raise HeaderError("a header is a JSON object")
    tid = header.get("id")
    if not isinstance(tid, str) or not TASK_ID.fullmatch(tid):
        raise HeaderError(f"header id {str(tid)[:40]!r} is not a task id")
    if not isinstance(header.get("asker"), str):
        raise HeaderError("header has no asker")
    if not isinstance(header.get("model"), str) or not header["model"]:
        raise HeaderError("header names no model")
    max_price = header.get("maxPrice")
    if max_price is not None and (type(max_price) is not int or max_price < 0):
        raise HeaderError(f"header maxPrice {max_price!r} is not a whole number of millicredits")
    if header.get("v") != VERSION:
        raise HeaderError(f"header version {header.get('v')!r} is not {VERSION}")


def verify_header(header: dict[str, Any]) -> str:
    """The header's hash (``header_hash``) if ``header`` is well formed and signed by its
    ``asker``; HeaderError else. (Numbers may have come back as floats from a Yjs map:
    read as the integers signed.) The hash comes with the check, since a verified header
    is then hashed (its grant, its receipt): read as signed once for both."""
    try:
        header = plain(header)
    except SignatureError as exc:
        raise HeaderError(f"header: {exc}") from None
    check_fields(header)
    sig = header.get("sig")
    try:
        raw = unb64url(sig if isinstance(sig, str) else "", 64, "header signature")
        verify(header["asker"], LABEL + _canonical(_unsigned(header), plained=True), raw)
    except (IdentityError, BadSignature) as exc:
        raise HeaderError(f"header of task {header['id']}: {exc}") from None
    return _hash(_canonical(header, plained=True))


def header_hash(header: dict[str, Any]) -> str:
    """BLAKE2b-256 of the signed header's canonical JSON, in base64url."""
    return _hash(_canonical(header))
