"""The frames of Igora protocol 3 on its one websocket (docs/protocol-v3.md §3).

Every frame is binary and lib0-encoded: a varUint kind, then its body. ``decode`` reads
a frame whole and strictly (every length checked, nothing left over) and raises
``WireError`` on anything else; ``encode`` is its inverse. Both ends use this module: the
market (which disconnects on a ``WireError``) and ``igora.v3.session``.

A ``DOC`` frame carries one y-sync message for one document: step 1 (a state vector),
step 2 (an update answering a step 1) or an update, exactly as y-websocket's message
type 0 does for its one document.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from ..lib0 import Reader, uint_bytes

SUBPROTOCOL = "igora.3"
"""The websocket subprotocol a v3 agent asks for (``Sec-WebSocket-Protocol``)."""

MAX_NAMES = 1_000  # names in one SUB or UNSUB
MAX_BATCH = 10_000  # frames in one BATCH
MAX_JSON_DEPTH = 16


class Kind(IntEnum):
    DOC = 0
    AUTH = 2  # y-protocols' auth message type, on purpose (protocol-v3.md §3)
    SUB = 4
    UNSUB = 5
    PRESENCE = 6
    NOTICE = 7
    BATCH = 8
    CONTROL = 9


class Sync(IntEnum):
    """The y-sync message types a ``DOC`` frame carries."""

    STEP1 = 0
    STEP2 = 1
    UPDATE = 2


class AuthType(IntEnum):
    DENIED = 0  # y-protocols: permission denied, with a reason
    CHALLENGE = 16
    RESPONSE = 17
    WELCOME = 18


class Close(IntEnum):
    """Websocket close codes of a v3 room (security.md §3)."""

    BAD_FRAME = 4400  # a frame this module cannot read, or one out of place
    NO_PROOF = 4401  # no handshake, a bad one, or too late
    FORBIDDEN = 4403  # not a member, banned, or a write to a document not owned
    NEEDS_V3 = 4426  # the room speaks protocol 3 and the client did not ask for it


class Code(IntEnum):
    """``NOTICE`` codes (market -> agent)."""

    LEASE_GRANTED = 200
    CREDITS = 201  # a claim, transfer or balance answered: JSON (igora.market.v3.bank)
    CREDITS_PENDING = 202  # a claim without receipt, settled after --receipt-wait
    REPLACED = 205
    VIEW = 206  # a room's view (CONTROL view), JSON: protocol-v3.md §12.8
    REFUSED = 403  # a subscription the read rules refuse
    LEASE_HELD = 409
    DROPPED = 410  # the document was dropped by its owner or expired
    CREDITS_REFUSED = 422  # a claim or transfer refused: JSON with the reason
    CREDITS_UNAVAILABLE = 503  # replicas: the ledger's holder did not answer (ask again)


class WireError(ValueError):
    """A frame that is not a well-formed v3 frame."""


@dataclass(frozen=True, slots=True)
class Doc:
    name: str
    sync: Sync
    payload: bytes  # a state vector (STEP1) or a Yjs update (STEP2, UPDATE)


@dataclass(frozen=True, slots=True)
class Auth:
    type: AuthType
    body: dict[str, Any] | str  # JSON object; for DENIED the reason text


@dataclass(frozen=True, slots=True)
class Subscribe:
    names: tuple[tuple[str, bool], ...]  # (name, is a prefix)
    unsubscribe: bool = False


@dataclass(frozen=True, slots=True)
class Presence:
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Notice:
    code: int
    doc: str
    text: str


def notice_answer(text: str, op: str) -> dict[str, Any] | None:
    """The JSON object a ``NOTICE`` text carries as the market's answer to ``CONTROL op``
    (the credits' ``claim``, ``transfer``, ``balance``: protocol-v3.md §12.9), or None
    for any other notice."""
    try:
        body = json.loads(text)
    except ValueError:
        return None
    return body if isinstance(body, dict) and body.get("op") == op else None


@dataclass(frozen=True, slots=True)
class Batch:
    frames: tuple[bytes, ...]  # each an encoded frame, never itself a BATCH


@dataclass(frozen=True, slots=True)
class Control:
    body: dict[str, Any]  # always has a string "op"


Frame = Doc | Auth | Subscribe | Presence | Notice | Batch | Control


def _string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return uint_bytes(len(raw)) + raw


def _chunk(b: bytes) -> bytes:
    return uint_bytes(len(b)) + b


def _json(body: dict[str, Any]) -> bytes:
    return _string(json.dumps(body, separators=(",", ":"), ensure_ascii=False))


def encode(frame: Frame) -> bytes:
    """The bytes of one frame."""
    if isinstance(frame, Doc):
        return (
            uint_bytes(Kind.DOC)
            + _string(frame.name)
            + uint_bytes(frame.sync)
            + _chunk(frame.payload)
        )
    if isinstance(frame, Auth):
        body = frame.body
        text = _string(body) if isinstance(body, str) else _json(body)
        return uint_bytes(Kind.AUTH) + uint_bytes(frame.type) + text
    if isinstance(frame, Subscribe):
        out = bytearray(uint_bytes(Kind.UNSUB if frame.unsubscribe else Kind.SUB))
        out += uint_bytes(len(frame.names))
        for name, prefix in frame.names:
            out += _string(name) + uint_bytes(1 if prefix else 0)
        return bytes(out)
    if isinstance(frame, Presence):
        return uint_bytes(Kind.PRESENCE) + _json(frame.body)
    if isinstance(frame, Notice):
        return (
            uint_bytes(Kind.NOTICE)
            + uint_bytes(frame.code)
            + _string(frame.doc)
            + _string(frame.text)
        )
    if isinstance(frame, Batch):
        return (
            uint_bytes(Kind.BATCH)
            + uint_bytes(len(frame.frames))
            + b"".join(_chunk(f) for f in frame.frames)
        )
    return uint_bytes(Kind.CONTROL) + _json(frame.body)


def batch(frames: list[bytes]) -> bytes:
    """One frame for several encoded frames: the frame itself when there is one."""
    return frames[0] if len(frames) == 1 else encode(Batch(tuple(frames)))


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _depth(value: Any, limit: int) -> int:
    if limit < 0:
        raise WireError(f"JSON nested deeper than {MAX_JSON_DEPTH}")
    if isinstance(value, dict):
        return 1 + max((_depth(v, limit - 1) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v, limit - 1) for v in value), default=0)
    return 0


def _object(r: Reader, what: str) -> dict[str, Any]:
    raw = r.text(what)
    try:
        value = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise WireError(f"{what} is not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise WireError(f"{what} must be a JSON object")
    # no deeper than its opening brackets (counted at C speed, those in strings too):
    # the walk of every value is needed only for a text with more of them than the limit
    if raw.count("{") + raw.count("[") > MAX_JSON_DEPTH:
        _depth(value, MAX_JSON_DEPTH)
    return value


def decode(data: bytes, *, in_batch: bool = False) -> Frame:
    """Read one frame whole; ``WireError`` if it is not a well-formed frame."""
    r = Reader(data, WireError)
    kind = r.uint()
    frame: Frame
    if kind == Kind.DOC:
        name = r.text("document name")
        step = r.uint()
        if step not in (Sync.STEP1, Sync.STEP2, Sync.UPDATE):
            raise WireError(f"unknown sync message type {step}")
        frame = Doc(name, Sync(step), r.chunk())
    elif kind == Kind.AUTH:
        sub = r.uint()
        if sub == AuthType.DENIED:
            frame = Auth(AuthType.DENIED, r.text("reason"))
        elif sub in (AuthType.CHALLENGE, AuthType.RESPONSE, AuthType.WELCOME):
            frame = Auth(AuthType(sub), _object(r, "auth message"))
        else:
            raise WireError(f"unknown auth message type {sub}")
    elif kind in (Kind.SUB, Kind.UNSUB):
        n = r.uint()
        if n > MAX_NAMES:
            raise WireError(f"{n} names in one subscription (at most {MAX_NAMES})")
        names = []
        for _ in range(n):
            name = r.text("document name")
            flags = r.uint()
            if flags not in (0, 1):
                raise WireError(f"unknown subscription flags {flags}")
            names.append((name, flags == 1))
        frame = Subscribe(tuple(names), kind == Kind.UNSUB)
    elif kind == Kind.PRESENCE:
        frame = Presence(_object(r, "presence"))
    elif kind == Kind.NOTICE:
        frame = Notice(r.uint(), r.text("document name"), r.text("notice"))
    elif kind == Kind.BATCH:
        if in_batch:
            raise WireError("a BATCH inside a BATCH")
        n = r.uint()
        if n == 0 or n > MAX_BATCH:
            raise WireError(f"a BATCH of {n} frames (1 to {MAX_BATCH})")
        frame = Batch(tuple(r.chunk() for _ in range(n)))
    elif kind == Kind.CONTROL:
        body = _object(r, "control")
        if not isinstance(body.get("op"), str):
            raise WireError('a CONTROL frame needs a string "op"')
        frame = Control(body)
    else:
        raise WireError(f"unknown frame kind {kind}")
    if r.pos != len(data):
        raise WireError("trailing bytes after the frame")
    return frame


def frames(data: bytes) -> list[Frame]:
    """The frames of one websocket message: the members of a ``BATCH``, or the frame."""
    frame = decode(data)
    if isinstance(frame, Batch):
        return [decode(f, in_batch=True) for f in frame.frames]
    return [frame]


def denied(reason: str) -> bytes:
    """A y-protocols permission-denied message: what a y-websocket client understands."""
    return encode(Auth(AuthType.DENIED, reason))
