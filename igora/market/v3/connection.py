"""One websocket of protocol 3: the handshake, then the frames of an agent.

The market speaks first (``AUTH CHALLENGE``); until a ``RESPONSE`` proves the identities
it names, nothing else is accepted: any other frame, a signature that does not verify
(a replayed response signs another connection's nonce), or ``AUTH_TIMEOUT`` seconds of
silence close the socket with 4401 (docs/security.md §3). Then each id must be admitted
(``igora.market.members``: a member, an invitation, not banned): the ids admitted are
granted; if none is, an ``AUTH DENIED`` says why and the socket is closed with 4403
(``deny``, also what the market does to a connection whose id is banned or removed
later). After ``WELCOME`` every frame
is read whole (``igora.v3.wire``) and checked on names (``igora.v3.documents``) before the
room sees it (docs/protocol-v3.md §4):

- ``DOC`` step 2 or update: only to a document one of the proved ids owns (else 4403),
  and only an update ``igora.updates`` and pycrdt can read (else 4400); the room appends
  it and relays it to the document's readers;
- ``DOC`` step 1 (a state vector): from the owner or a reader, answered with the diff
  (step 2); the owner also gets the market's step 1, so that it sends what the market
  lacks (its re-sync after a reconnection); from anyone else a ``NOTICE`` 403;
- ``SUB``: checked against the read rules; a refusal is a ``NOTICE`` 403, not a close;
- ``UNSUB``, ``PRESENCE``: taken; ``CONTROL``: one handler per op (``lease``,
  ``attach``, ``advert``, ``drop``, ``replace``: a new epoch of a long-lived document,
  §9; the credits' ``claim``, ``transfer``, ``balance``, answered by the market's
  ``bank.Bank``; ``view``, the room's view in a ``NOTICE`` 206); any other, a
  ``NOTICE`` 501.

What the market sends goes through the connection's outbox (``fanout.Outbox``): frames
that pile up while one is written leave as one ``BATCH`` (``igora.v3.outbox.coalesce``,
the agents' own).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from typing import Any

from pycrdt import get_state
from starlette.websockets import WebSocket

from ...agent import DEFAULT_HEARTBEAT
from ...aio import within
from ...credits import pricing
from ...identity import ID_LENGTH, Identity
from ...protocol import number
from ...ratelog import RateLimitedLog
from ...updates import UpdateError, check_update, is_panic
from ...v3 import wire
from ...v3.advert import AdvertError
from ...v3.advert import check as check_advert
from ...v3.documents import (
    TASK_DOCUMENTS,
    DocumentError,
    may_read,
    may_read_prefix,
    may_write,
    parse,
)
from ...v3.handshake import Challenge, HandshakeError, Response, Welcome
from ...v3.outbox import coalesce
from ..fanout import Outbox
from ..members import Membership
from .bank import Credits, notice_text
from .room import V3Room

AUTH_TIMEOUT = 5.0
"""Seconds a new connection has to send its RESPONSE."""
MAX_SUBSCRIPTIONS = 10_000
"""Documents one connection may be subscribed to by name."""
MISSED_HEARTBEATS = 3
"""A connection silent for this many of its heartbeats is closed (protocol-v3.md §6)."""
HEARTBEATS = (0.1, 300.0)
"""The heartbeats (s) a PRESENCE may announce."""
SILENT = 4408  # closed for silence: no frame for MISSED_HEARTBEATS heartbeats
MAX_STATE = 4096  # bytes of a PRESENCE state
MAX_ATTACHMENTS = 10_000
"""Documents one identity may be attached to at once."""
MAX_REASON = 123  # bytes of a websocket close reason
CREDIT_OPS = ("claim", "transfer", "balance", "entries")
ID = re.compile(rf"[A-Za-z0-9_-]{{{ID_LENGTH}}}")

log = logging.getLogger("igora.market")

Problem = tuple[int, str]
"""Why a connection is closed: the close code and the reason."""


def _short(reason: str) -> str:
    """``reason`` cut to what a websocket close frame carries."""
    raw = reason.encode("utf-8")[:MAX_REASON]
    return raw.decode("utf-8", "ignore")


class V3Connection:
    """One agent's socket to a v3 room: its proved identities, subscriptions, outbox."""

    def __init__(
        self,
        websocket: WebSocket,
        room: str,
        peer: str,
        market: Identity,
        limits: dict[str, Any],
        brokers: frozenset[str] | None = None,
        refusals: RateLimitedLog | None = None,
        membership: Membership | None = None,
    ) -> None:
        self.websocket = websocket
        self.room_name = room
        self.peer = peer
        self.market = market
        self.limits = limits
        self.brokers = brokers  # ids that may hold the broker lease (None: any)
        self.refusals = refusals  # the log of refused handshakes
        self.membership = membership  # who is admitted (None: any identity)
        self.broker = False  # whether one of its proved ids may
        self.ids: frozenset[str] = frozenset()
        self.subscribed: set[str] = set()  # kept by the room (subscriptions, attachments)
        self.prefixes: set[str] = set()
        self.closed = False
        self.last_seen = time.monotonic()
        self.heartbeat = DEFAULT_HEARTBEAT  # until its PRESENCE says otherwise
        self.state: dict[str, Any] = {}  # its last PRESENCE state
        self.outbox = Outbox(self._write, peer, coalesce)

    @property
    def who(self) -> str:
        """The peer and the first proved id, shortened as the logs show ids."""
        return f"{self.peer} ({min(self.ids)[:8]})" if self.ids else self.peer

    # ------------------------------------------------------------------ handshake
    async def handshake(self) -> bool:
        """Challenge the agent; True once it proved its ids and was welcomed."""
        challenge = Challenge.fresh(self.market.id, self.room_name)
        if not await self._send_now(wire.encode(challenge.frame())):
            return False
        try:
            message = await within(self.websocket.receive(), AUTH_TIMEOUT)
        except TimeoutError:
            await self.close(wire.Close.NO_PROOF, f"no RESPONSE within {AUTH_TIMEOUT:g} s")
            return False
        if message["type"] == "websocket.disconnect":
            self.closed = True
            return False
        try:
            data = message.get("bytes")
            if data is None:
                raise HandshakeError("a text frame (protocol 3 is binary)")
            frame = wire.decode(data)
            if not isinstance(frame, wire.Auth) or frame.type is not wire.AuthType.RESPONSE:
                raise HandshakeError(f"{type(frame).__name__} frame before the handshake")
            response = Response.read(frame)
            transcript = response.check(challenge)
        except (wire.WireError, HandshakeError) as exc:
            await self.close(wire.Close.NO_PROOF, f"handshake refused: {exc}")
            return False
        granted = response.ids
        if self.membership is not None:  # members, bans, invitations (security.md §5)
            granted, refusal = await self.membership.admit(response.ids, response.invite)
            if not granted:
                await self.deny(refusal or "not admitted")
                return False
        self.ids = frozenset(granted)
        self.broker = self.brokers is None or bool(self.ids & self.brokers)
        welcome = Welcome.make(self.market, transcript, granted, self.limits)
        # Sent alone, before anything of the room: an agent reads it as one frame.
        return await self._send_now(wire.encode(welcome.frame()))

    async def _send_now(self, message: bytes) -> bool:
        """Send outside the outbox (the handshake); False if the socket is gone."""
        try:
            await self.websocket.send_bytes(message)
        except Exception:
            self.closed = True
            return False
        return True

    # ------------------------------------------------------------------ frames
    async def serve(self, room: V3Room) -> None:
        """Read frames until the socket closes or breaks a rule."""
        while not self.closed:
            silence = MISSED_HEARTBEATS * self.heartbeat
            try:
                message = await within(self.websocket.receive(), silence)
            except TimeoutError:
                await self.close(SILENT, f"nothing received for {silence:g} s")
                return
            if message["type"] == "websocket.disconnect":
                if message.get("code") == 1009:
                    log.warning("%s: disconnected, message over the size limit", self.who)
                break
            data = message.get("bytes")
            if data is None:
                await self.close(wire.Close.BAD_FRAME, "text frame (protocol 3 is binary)")
                return
            try:
                frames = wire.frames(data)
            except wire.WireError as exc:
                await self.close(wire.Close.BAD_FRAME, f"bad frame: {exc}")
                return
            self.last_seen = time.monotonic()
            for frame in frames:  # no await between two frames: the room sees them in order
                problem = self.handle(room, frame)
                if problem is not None:
                    await self.close(*problem)
                    return
        self.closed = True
        self.outbox.close()

    def handle(self, room: V3Room, frame: wire.Frame) -> Problem | None:
        """Take one frame; what closes the connection, if it breaks a rule."""
        if isinstance(frame, wire.Doc):
            return self._doc(room, frame)
        if isinstance(frame, wire.Subscribe):
            if frame.unsubscribe:
                for name, prefix in frame.names:
                    if prefix:
                        room.unsubscribe_prefix(self, name)
                    else:
                        room.unsubscribe(self, name)
            else:
                self._subscribe(room, frame.names)
            return None
        if isinstance(frame, wire.Presence):
            problem = self._presence(frame.body)
            if problem is None:
                room.presence(self)
            return problem
        if isinstance(frame, wire.Control):
            return self._control(room, frame.body)
        if isinstance(frame, wire.Auth):
            return wire.Close.BAD_FRAME, "AUTH frame after the handshake"
        return wire.Close.BAD_FRAME, f"{type(frame).__name__} frames go from the market only"

    def _doc(self, room: V3Room, frame: wire.Doc) -> Problem | None:
        try:
            doc = parse(frame.name)
        except DocumentError as exc:
            return wire.Close.BAD_FRAME, str(exc)
        owner = may_write(doc, self.ids, lease=room.lease.holder is self)
        if frame.sync is wire.Sync.STEP1:
            if not owner and not room.reads(self, doc.name):
                self.notice(wire.Code.REFUSED, doc.name, "step 1 for a document you do not read")
                return None
            try:
                diff = room.sync(doc.name, frame.payload)
            except ValueError:
                return wire.Close.BAD_FRAME, f"bad state vector for {doc.name}"
            self.outbox.put(wire.encode(wire.Doc(doc.name, wire.Sync.STEP2, diff)))
            if owner:  # the owner sends back what the market lacks
                vector = room.vector(doc.name)
                self.outbox.put(wire.encode(wire.Doc(doc.name, wire.Sync.STEP1, vector)))
            return None
        if not owner:
            return wire.Close.FORBIDDEN, f"write to a document you do not own: {doc.name}"
        try:
            check_update(frame.payload)  # what yrs cannot represent would break readers
            get_state(frame.payload)
        except (UpdateError, ValueError) as exc:
            return wire.Close.BAD_FRAME, f"refused update of {doc.name}: {exc}"
        except BaseException as exc:
            if not is_panic(exc):
                raise
            return wire.Close.BAD_FRAME, f"refused update of {doc.name}: pycrdt panicked"
        refusal = room.write(self, doc, frame.payload)
        if refusal is not None:
            return wire.Close.BAD_FRAME, f"refused update ({refusal}): {doc.name}"
        return None

    def _subscribe(self, room: V3Room, names: tuple[tuple[str, bool], ...]) -> None:
        for name, prefix in names:
            if prefix:
                if may_read_prefix(name, broker=self.broker):
                    room.subscribe_prefix(self, name)
                else:
                    self.notice(wire.Code.REFUSED, name, "prefix subscriptions are for brokers")
                continue
            try:
                doc = parse(name)
            except DocumentError as exc:
                self.notice(wire.Code.REFUSED, name[:200], str(exc))
                continue
            if not may_read(doc, self.ids, self.broker, room.attached(self, name)):
                self.notice(wire.Code.REFUSED, name, f"you may not read {name}")
            elif name not in self.subscribed and len(self.subscribed) >= MAX_SUBSCRIPTIONS:
                self.notice(wire.Code.REFUSED, name, f"{MAX_SUBSCRIPTIONS} subscriptions already")
            else:
                room.subscribe(self, name)

    def _presence(self, body: dict[str, Any]) -> Problem | None:
        """Liveness (§6): nothing is relayed; the heartbeat sets how long a silence
        closes the connection, the state is what ``who`` shows."""
        if "heartbeat" in body:
            beat = number(body["heartbeat"])
            low, high = HEARTBEATS
            if beat is None or not low <= beat <= high:
                return wire.Close.BAD_FRAME, f"a PRESENCE heartbeat is {low:g} to {high:g} s"
            self.heartbeat = beat
        state = body.get("state", {})
        if not isinstance(state, dict):
            return wire.Close.BAD_FRAME, "a PRESENCE state is an object"
        if len(json.dumps(state)) > MAX_STATE:
            return wire.Close.BAD_FRAME, f"a PRESENCE state over {MAX_STATE} bytes"
        self.state = state
        return None

    # ------------------------------------------------------------------ CONTROL
    def _control(self, room: V3Room, body: dict[str, Any]) -> Problem | None:
        op = body["op"]
        if op == "lease":
            self._lease(room)
            return None
        if op == "attach":
            return self._attach(room, body)
        if op == "advert":
            id_ = body.get("id")
            if id_ not in self.ids:
                return wire.Close.FORBIDDEN, f"an advert for an id not proved here: {id_!r:.60}"
            try:
                advert = check_advert(body)
            except AdvertError as exc:
                return wire.Close.BAD_FRAME, str(exc)
            pinned = room.bank.pinned if room.bank is not None else {}
            refusal = pricing.pin_refusal(pinned, advert.get("models"))
            if refusal is not None:  # retrying cannot cure it: the worker stops (credits.md §1)
                return wire.Close.FORBIDDEN, refusal
            room.advert(advert)
            return None
        if op in ("drop", "replace"):
            name = body.get("doc")
            if not isinstance(name, str):
                return wire.Close.BAD_FRAME, f'a {op} names its "doc"'
            try:
                doc = parse(name)
            except DocumentError as exc:
                return wire.Close.BAD_FRAME, str(exc)
            if not may_write(doc, self.ids, lease=room.lease.holder is self):
                return wire.Close.FORBIDDEN, f"{op} of a document you do not own: {name}"
            if op == "drop":
                room.drop(self, name)
            elif doc.kind in TASK_DOCUMENTS:
                return wire.Close.BAD_FRAME, f"a task document is dropped, not replaced: {name}"
            else:  # its new state follows as a step 2 (protocol-v3.md §9)
                room.replace(self, name)
            return None
        if op == "view":  # the handshake admitted this connection: it may look
            self.notice(wire.Code.VIEW, "", room.view_text())
            return None
        if op in CREDIT_OPS and room.bank is not None:
            self._credits(room, room.bank, op, body)
            return None
        if op in CREDIT_OPS:
            self.notice(501, "", f"CONTROL {op!r}: this market keeps no credits")
            return None
        self.notice(501, "", f"CONTROL {op[:40]!r} is not built (protocol-v3.md §12)")
        return None

    def _credits(self, room: V3Room, bank: Credits, op: str, body: dict[str, Any]) -> None:
        """A credits op (credits.md §3, §5): answered by a ``NOTICE`` (201 done, 202 a
        claim waiting for its receipt, 422 refused) whose text is JSON."""

        def reply(code: int, answer: dict[str, Any]) -> None:
            if not self.closed:
                self.notice(code, "", notice_text(answer))

        def params_of(worker: str, model: str) -> str:
            advert = room.market_docs.advert_of(worker) or {}
            return pricing.model_params(advert.get("models"), model)

        if op == "claim":
            bank.claim(room.name, self.ids, body, params_of, reply)
        elif op == "transfer":
            bank.transfer(self.ids, body, reply)
        elif op == "balance":
            bank.balance_of(self.ids, body, reply)
        else:
            bank.entries_of(self.ids, body, reply)

    def _lease(self, room: V3Room) -> None:
        if not self.broker:
            self.notice(wire.Code.REFUSED, "", "your identity may not be a broker here")
            return
        granted = room.request_lease(self)
        if granted:
            self.lease_granted(room.lease.epoch)
        elif granted is not None:  # None: the answer comes once Redis gave it
            self.lease_held(room.lease.epoch, room.lease.waiting.index(self) + 1)

    def lease_held(self, epoch: int, place: int) -> None:
        text = f"lease held, epoch {epoch}; you are number {place} in line"
        self.notice(wire.Code.LEASE_HELD, "", text)

    def _attach(self, room: V3Room, body: dict[str, Any]) -> Problem | None:
        """The lease holder attaches an identity to task documents (protocol-v3.md §5)."""
        if room.lease.holder is not self:
            self.notice(wire.Code.REFUSED, "", "only the broker lease holder attaches")
            return None
        to, names = body.get("to"), body.get("docs")
        if not isinstance(to, str) or not ID.fullmatch(to):
            return wire.Close.BAD_FRAME, 'an attach names an agent id "to"'
        if not isinstance(names, list) or not 0 < len(names) <= wire.MAX_NAMES:
            return wire.Close.BAD_FRAME, f'an attach lists 1 to {wire.MAX_NAMES} "docs"'
        for name in names:
            try:
                doc = parse(name) if isinstance(name, str) else None
            except DocumentError:
                doc = None
            if doc is None or doc.kind not in TASK_DOCUMENTS:
                return wire.Close.BAD_FRAME, f"only task documents are attached, not {name!r:.80}"
        attached = room.attachments.get(to, set())
        if len(attached | set(names)) > MAX_ATTACHMENTS:
            self.notice(wire.Code.REFUSED, "", f"{to} has {MAX_ATTACHMENTS} attachments already")
            return None
        room.attach(to, names)
        return None

    def lease_granted(self, epoch: int) -> None:
        log.info("room %s: broker lease to %s, epoch %d", self.room_name, self.who, epoch)
        self.notice(wire.Code.LEASE_GRANTED, "", f"lease granted, epoch {epoch}")

    def notice(self, code: int, doc: str, text: str) -> None:
        self.outbox.put(wire.encode(wire.Notice(int(code), doc, text)))

    # ------------------------------------------------------------------ sending, closing
    async def _write(self, message: bytes) -> None:
        if self.closed:
            return
        try:
            await self.websocket.send_bytes(message)
        except Exception:
            self.closed = True
            self.outbox.close()

    async def deny(self, reason: str) -> None:
        """Refuse the connection's identity (not a member, banned): the reason in an
        ``AUTH DENIED``, then 4403. A second call does nothing."""
        if not self.closed:
            await self.close(wire.Close.FORBIDDEN, reason, denied=True)

    async def close(self, code: int, reason: str, denied: bool = False) -> None:
        """Close with ``code``: one log line saying who and why (before the handshake,
        at most one a second per address: anyone can cause those at will). The reason
        goes whole in an ``AUTH DENIED`` first (the agent's session reads it as the
        close's reason) when ``denied`` or when a close frame would cut it (123 bytes:
        a pinned size's refusal is longer). Nothing of the room is sent after it."""
        if self.ids or self.refusals is None:
            log.warning("%s: disconnected (%d), %s", self.who, code, reason)
        else:
            address = self.peer.rpartition(":")[0]
            self.refusals("%s: disconnected (%d), %s", self.peer, code, reason, key=address)
        first = not self.closed
        self.closed = True
        self.outbox.close()
        if first and (denied or len(reason.encode("utf-8")) > MAX_REASON):
            await self._send_now(wire.denied(reason))
        with contextlib.suppress(Exception):
            await self.websocket.close(code=int(code), reason=_short(reason))
