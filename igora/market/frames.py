"""The y-websocket frames the market reads and writes.

Every incoming frame is checked whole before a room sees it (``check_frame``): message
type, framing, awareness JSON, and every document update read by ``igora.updates``. A
frame that fails is a ``BadFrame``: its sender is disconnected and nothing of it is kept.
The awareness messages the market writes itself (``removal_message``) are built here too.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

from pycrdt import Encoder, YMessageType, YSyncMessageType, create_awareness_message

from ..lib0 import Reader, uint_bytes
from ..updates import Parsed, UpdateError, check_update

if TYPE_CHECKING:
    from pycrdt import Awareness

QUERY_AWARENESS = 3
AUTH = 2
MAX_AWARENESS_ENTRIES = 10_000

AwarenessEntry = tuple[int, int, "dict[str, Any] | None"]
"""One state of an awareness update: client id, clock, state (None: removed)."""


class BadFrame(ValueError):
    """A frame that breaks the y-websocket protocol; its sender is disconnected."""


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN/Infinity would break JavaScript peers


def awareness_entries(payload: bytes) -> list[AwarenessEntry]:
    """Decode an awareness update fully; raise BadFrame on anything malformed."""
    r = Reader(payload, BadFrame)
    n = r.uint()
    if n > MAX_AWARENESS_ENTRIES:
        raise BadFrame("too many awareness entries")
    out: list[AwarenessEntry] = []
    for _ in range(n):
        client_id = r.uint()
        clock = r.uint()
        raw = r.text("awareness state")
        try:
            state = json.loads(raw, parse_constant=_no_constant) if raw else None
        except (ValueError, RecursionError) as exc:
            raise BadFrame(f"awareness state is not JSON ({exc})") from None
        if state is not None and not isinstance(state, dict):
            raise BadFrame("awareness state must be an object or null")
        out.append((client_id, clock, state))
    if r.pos != len(payload):
        raise BadFrame("trailing bytes after the awareness update")
    return out


def awareness_presence(payload: bytes) -> list[tuple[int, bool]]:
    """The client ids of an awareness update, each with whether it carries a state (not
    ``null``), without decoding the states: for updates checked already (by the replica
    that received them, ``replicas``)."""
    r = Reader(payload, BadFrame)
    out = []
    for _ in range(r.uint()):
        client_id = r.uint()
        r.uint()  # clock
        out.append((client_id, r.chunk() != b"null"))
    return out


class Frame(NamedTuple):
    """What ``check_frame`` read of a frame."""

    awareness: list[AwarenessEntry]  # of an awareness frame
    update: bytes | None = None  # of a sync step 2 or update frame
    parsed: Parsed | None = None  # what igora.updates read of it


def check_frame(message: bytes) -> Frame:
    """Check one incoming frame; raise BadFrame if it may not reach the room."""
    r = Reader(message, BadFrame)
    kind = r.uint()
    if kind == YMessageType.SYNC:
        step = r.uint()
        if step not in (
            YSyncMessageType.SYNC_STEP1,
            YSyncMessageType.SYNC_STEP2,
            YSyncMessageType.SYNC_UPDATE,
        ):
            raise BadFrame(f"unknown sync message type {step}")
        update = r.chunk()
        if step == YSyncMessageType.SYNC_STEP1:
            return Frame([])
        try:  # what yrs cannot represent would crash or break it (igora.updates)
            parsed = check_update(update)
        except UpdateError as exc:
            raise BadFrame(f"refused update: {exc}") from None
        if parsed.skips:  # see igora.market.causal
            raise BadFrame("refused update: it has Skip structs (gaps in a client's clocks)")
        return Frame([], update, parsed)
    if kind == YMessageType.AWARENESS:
        return Frame(awareness_entries(r.chunk()))
    if kind in (AUTH, QUERY_AWARENESS):
        return Frame([])
    raise BadFrame(f"unknown message type {kind}")


def awareness_message(states: Iterable[tuple[int, int, dict[str, Any] | None]]) -> bytes:
    """An awareness message carrying each (client id, clock, state); a state of None is
    written ``null``: its removal, as y-protocols writes one."""
    entries = list(states)
    enc = Encoder()
    enc.write_var_uint(len(entries))
    for client_id, clock, state in entries:
        enc.write_var_uint(client_id)
        enc.write_var_uint(clock)
        enc.write_var_string("null" if state is None else json.dumps(state, separators=(",", ":")))
    return create_awareness_message(enc.to_bytes())


class EncodedStates:
    """Each awareness state of a room as its wire entry, encoded once per (client id,
    clock): every connection that joins is sent the states of all the others, and
    encoding them all again (JSON) for each one cost agents x agents at every join."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[int, object, bytes]] = {}  # id -> clock, state, entry

    def message(self, awareness: Awareness, ids: list[int]) -> bytes:
        """The awareness message of these clients' states (each present in ``awareness``)."""
        states, meta, cache = awareness.states, awareness.meta, self._entries
        parts = [uint_bytes(len(ids))]
        for client_id in ids:
            clock, state = int(meta[client_id]["clock"]), states[client_id]
            hit = cache.get(client_id)
            if hit is None or hit[0] != clock or hit[1] is not state:
                text = json.dumps(state, separators=(",", ":")).encode()
                entry = uint_bytes(client_id) + uint_bytes(clock) + uint_bytes(len(text)) + text
                hit = cache[client_id] = (clock, state, entry)
            parts.append(hit[2])
        if len(cache) > 2 * len(states) + 64:  # states removed since: forget their entries
            self._entries = {c: e for c, e in cache.items() if c in states}
        return create_awareness_message(b"".join(parts))


def removal_message(states: Iterable[tuple[int, int]]) -> bytes:
    """An awareness message saying that each (client id, clock) state is removed."""
    return awareness_message((client_id, clock, None) for client_id, clock in states)
