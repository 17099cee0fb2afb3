"""A v3 agent's connection to one market room (docs/protocol-v3.md §3-§6, security.md §3).

A ``Session`` is what the v3 roles build on: one websocket asking for the subprotocol
``igora.3``, the handshake that proves its identities (one, or several for a gateway) and
checks the market's key, then documents:

- ``own(name)``: a ``pycrdt.Doc`` this session writes; each local transaction goes out as
  a ``DOC`` update. Only names one of its identities owns (``documents.may_write``).
- ``subscribe(name)`` / ``subscribe(prefix, prefix=True)`` / ``unsubscribe``: documents
  it reads, each kept as a ``Doc`` the market's updates are applied to. Documents the
  market sends without a subscription by name (a prefix's, or attached by the broker,
  §5) get a ``Doc`` when their first update arrives. Only owned documents are observed:
  an observer makes pycrdt encode every update applied (about twice the cost of applying
  one, for every update the market sends), so a document only read and written locally
  changes this copy alone.
- ``observe(callback)`` / ``events()``: what happens, as ``Event``s: a document appeared
  or changed, a subscription was refused (``NOTICE`` 403), a document was dropped (410:
  its ``Doc`` is forgotten), the connection came or went, or the session gave up.
- ``prove(identity)`` adds an identity to a running session: the connection is made
  again at once, its handshake proving one more id (a gateway's key added while it runs).
- ``control(body)`` sends a ``CONTROL`` (``drop(name)`` the one that ends an owned
  document); a ``PRESENCE`` goes out every ``heartbeat`` seconds when nothing else did.

Reconnection follows the v2 agent's rules (igora.reconnect). After each ``WELCOME`` the
session subscribes again to every name and sends a ``DOC`` step 1 for every document it
owns: the market answers with what the session lacks (after a restart with an empty
``Doc``, its earlier content) and its own step 1, which the session answers with what the
market lacks. Writes made while disconnected are therefore delivered after reconnection;
nothing is queued meanwhile.

Bad input from the market (a frame ``wire.decode`` refuses, an update
``updates.check_update`` or pycrdt refuses, a document name that is none) is one log line
and a new connection, never a crash. A refusal that retrying cannot cure (the room speaks
v2, the market's key is not the one expected, a close 4401/4403/4426) ends the session
with a typed error: raised by ``start`` on the first connection, else kept in ``error``
and reported as a ``FAILED`` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any
from urllib.parse import urldefrag

from pycrdt import Doc, Subscription, TransactionEvent, get_state
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException
from websockets.typing import Subprotocol

from ..aio import stop_task, within
from ..config import ConfigError, MarketAddress, check_room, check_ws_url
from ..errors import IgoraError, MarketUnreachable
from ..identity import Identity, IdentityError, public_key
from ..market.compaction import release_memory, tune_allocator
from ..market.fanout import Outbox
from ..market.v3.connection import HEARTBEATS
from ..reconnect import BACKOFF_MAX, Backoff, log_unreachable
from ..updates import UpdateError, check_update, is_panic, state_vector
from . import known_markets
from .documents import PREFIXES, DocumentError, Owner, may_write, parse
from .epochs import REPLACE_AFTER, deleted_by, epoch_of, fresh
from .handshake import Challenge, HandshakeError, Response, Welcome, transcript
from .known_markets import KnownMarketsError, MarketKeyError
from .outbox import coalesce
from .wire import (
    MAX_NAMES,
    SUBPROTOCOL,
    Auth,
    AuthType,
    Close,
    Code,
    Control,
    Frame,
    Notice,
    Presence,
    Subscribe,
    Sync,
    WireError,
    encode,
    frames,
)
from .wire import Doc as DocFrame

DEFAULT_HEARTBEAT = 5.0
GONE_KEPT = 1024
"""Documents unsubscribed on a connection whose late updates are still ignored: the
last ones only (an update crosses an UNSUB by at most a round trip), so that the set stays
bounded when an asker runs a task after another on one connection."""

log = logging.getLogger("igora.v3")


class V2Room(IgoraError):
    """The market accepted the connection without the ``igora.3`` subprotocol: the room
    speaks protocol 2. Use the v2 ``Agent`` for it."""


class Refused(IgoraError):
    """The market refused this session: ``code`` is the close code (4401 no or bad
    proof, 4403 forbidden, 4426 the room needs protocol 3), ``reason`` what it said."""

    def __init__(self, url: str, code: int, reason: str) -> None:
        whats: dict[int, str] = {
            Close.NO_PROOF: "refused our proof of identity",
            Close.FORBIDDEN: "refused us",
            Close.NEEDS_V3: "refused the connection as not speaking protocol 3",
        }
        what = whats.get(code, "closed the connection")
        super().__init__(f"the market at {url} {what} (close {code}): {reason or 'no reason'}")
        self.code = code
        self.reason = reason


class BadMarket(IgoraError):
    """The market's handshake does not hold (its signature, its room): refused, since
    whoever answers is not the market it claims to be."""


FATAL_CLOSES = frozenset({Close.NO_PROOF, Close.FORBIDDEN, Close.NEEDS_V3})
"""Close codes that retrying cannot cure: the session ends with ``Refused``."""


class _BadInput(Exception):
    """The market sent something this session cannot use: reconnect and sync afresh."""


class EventKind(Enum):
    CONNECTED = "connected"  # a WELCOME: roles re-send their controls here
    DISCONNECTED = "disconnected"
    NEW = "new"  # a Doc was made for a document the market sent (prefix, attachment)
    CHANGED = "changed"  # the market's update was applied to a document's Doc
    REFUSED = "refused"  # NOTICE 403: the subscription is removed
    DROPPED = "dropped"  # NOTICE 410: the Doc is forgotten
    NOTICE = "notice"  # any other NOTICE (lease granted or held, replaced)
    FAILED = "failed"  # the session gave up: ``Session.error``


@dataclass(frozen=True)
class Event:
    kind: EventKind
    name: str = ""  # the document, when the event is about one
    code: int = 0  # the NOTICE code
    text: str = ""  # the NOTICE text, or the error


class Events:
    """The session's events, as an async iterator; registered when made, so nothing
    between ``session.events()`` and the first ``await`` is missed. ``close`` ends it."""

    def __init__(self, session: Session) -> None:
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._remove = session.observe(self._queue.put_nowait)

    def __aiter__(self) -> Events:
        return self

    async def __anext__(self) -> Event:
        return await self._queue.get()

    def close(self) -> None:
        self._remove()


def room_url(url: str) -> tuple[MarketAddress, str | None]:
    """The market address of ``ws(s)://host[:port][/path]/<room>[#key=ID]`` and the market
    key its fragment pins; ``ConfigError`` if it is not one."""
    base, fragment = urldefrag(url)
    market, _, room = base.rstrip("/").rpartition("/")
    if "//" not in market or market.endswith("/"):
        raise ConfigError(f"{url!r} names no room: expected ws://host:port/ROOM")
    key = None
    if fragment:
        name, _, key = fragment.partition("=")
        if name != "key":
            raise ConfigError(f"{url!r}: the only fragment understood is #key=MARKET-ID")
    return MarketAddress(check_ws_url(market), check_room(room)), key


async def speaks_v3(address: MarketAddress, timeout: float) -> bool:
    """Whether the room at ``address`` speaks protocol 3: the market accepts the
    ``igora.3`` subprotocol (§10). ``MarketUnreachable`` if nothing answers within
    ``timeout``. How a role that serves both versions chooses, before it needs an
    identity."""
    urls = address.room_urls  # several replicas: the first that answers
    last: BaseException | None = None
    for url in urls:
        try:
            async with connect(
                url,
                subprotocols=[Subprotocol(SUBPROTOCOL)],
                open_timeout=timeout / len(urls),
                max_size=None,
            ) as ws:
                return ws.subprotocol == SUBPROTOCOL
        except (OSError, WebSocketException, asyncio.TimeoutError) as exc:
            last = exc
    raise MarketUnreachable(
        f"no market answered at {address.room_url} within {timeout:g} s "
        f"({last or type(last).__name__}): is `igora market` running?"
    )


async def room_speaks_v3(address: MarketAddress, patience: float) -> bool | None:
    """``speaks_v3``, asked again every 0.2 s for ``patience`` seconds while no market
    answers; None if none did."""
    loop = asyncio.get_running_loop()
    end = loop.time() + patience
    while True:
        try:
            return await speaks_v3(address, max(end - loop.time(), 1.0))
        except MarketUnreachable:
            if loop.time() >= end:
                return None
            await asyncio.sleep(0.2)


ASK_AGAIN = 10.0
"""Seconds between two lines of ``room_protocol``'s log while no market answers."""


async def room_protocol(address: MarketAddress, who: str) -> bool:
    """Whether the room speaks version 3, once a market answers: an agent started before
    its market waits for it rather than guess (a version 2 agent in a version 3 room is
    refused, 4426, at every reconnection). Says so in the log every ASK_AGAIN seconds."""
    speaks = await room_speaks_v3(address, 0)
    if speaks is not None:
        return speaks
    while speaks is None:
        log.warning(
            "%s: no market answers at %s yet (is `igora market` running?); waiting for it",
            who,
            address.room_url,
        )
        speaks = await room_speaks_v3(address, ASK_AGAIN)
    log.info("%s: the market at %s answers", who, address.room_url)
    return speaks


def _check_key(key: str) -> str:
    try:
        public_key(key)
    except IdentityError as exc:
        raise ConfigError(f"market key: {exc}") from None
    return key


class Session:
    """One v3 connection to a market room, for one or several identities.

    Use as ``async with Session(url, identity) as s:``; on enter it waits for the first
    ``WELCOME`` (``MarketUnreachable`` after ``connect_timeout`` s, or the typed error of
    a refusal). ``url`` is ``ws(s)://host:port/<room>``, optionally ``#key=MARKET-ID``;
    ``market_key`` pins the key likewise, else ``DATA/known_markets`` does (``data``:
    default ``IGORA_DATA``)."""

    def __init__(
        self,
        url: str | MarketAddress,
        identities: Identity | Sequence[Identity],
        *,
        market_key: str | None = None,
        data: Path | None = None,
        name: str = "session",
        state: dict[str, Any] | None = None,
        heartbeat: float = DEFAULT_HEARTBEAT,
        connect_timeout: float = 10.0,
        backoff_max: float = BACKOFF_MAX,
        invite: str | None = None,
    ) -> None:
        if isinstance(url, MarketAddress):
            self.address, key = url, None
        else:
            self.address, key = room_url(url)
        if market_key is not None and key is not None and market_key != key:
            raise ConfigError(f"two market keys given: {market_key} and #key={key}")
        key = market_key if market_key is not None else key
        self.market_key = None if key is None else _check_key(key)
        self.identities = [identities] if isinstance(identities, Identity) else list(identities)
        if not self.identities:
            raise ValueError("a session needs at least one identity")
        self.ids = frozenset(i.id for i in self.identities)
        self.data = data
        self.name = name
        self.state: dict[str, Any] = dict(state or {})
        low, high = HEARTBEATS
        if not low <= heartbeat <= high:
            raise ConfigError(f"heartbeat {heartbeat:g} s: a market takes {low:g} to {high:g} s")
        self.heartbeat = heartbeat
        self.connect_timeout = connect_timeout
        self.backoff_max = backoff_max
        self.invite = invite

        self.docs: dict[str, Doc[Any]] = {}
        """Every document held: owned, subscribed, or sent by the market."""
        self.market: str | None = None  # the market's id, once a WELCOME proved it
        self.granted: list[str] = []
        self.limits: dict[str, Any] = {}
        self.lease = False  # a NOTICE said this connection holds the broker lease
        self.connected = False
        self.ready = asyncio.Event()  # set at the first WELCOME
        self.error: IgoraError | None = None
        self.last_error: str | None = None
        self._waited = False  # ``start`` waits for the first WELCOME

        self._owned: set[str] = set()
        self._subs: dict[str, bool] = {}  # name or prefix -> is a prefix
        # unsubscribed on this connection, the last GONE_KEPT: late updates ignored
        self._gone: dict[str, None] = {}
        # Epochs (protocol-v3.md §9): items deleted in each owned long-lived document
        # since its epoch began; owned documents replaced whose NOTICE 205 has not come
        # back yet (sent again after a reconnection); the epoch of each document read;
        # documents read whose next state from the market starts a new epoch.
        self.replaced = 0  # epochs this session started (replaces of owned documents)
        self._deleted: dict[str, int] = {}
        self._replacing: set[str] = set()
        self._epochs: dict[str, int] = {}
        self._fresh: set[str] = set()
        self._doc_subs: dict[str, Subscription] = {}
        self._drops: set[str] = set()  # dropped while disconnected: sent after WELCOME
        self._observers: list[Callable[[Event], None]] = []
        self._outbox: Outbox | None = None
        self._ws: ClientConnection | None = None
        self._applying: str | None = None  # the document a market's update is applied to
        self._last_put = 0.0
        self._denied = ""  # the reason of an AUTH DENIED, for the close that follows
        self._pending: list[Frame] = []  # read with the WELCOME, handled after it
        self._task: asyncio.Task[None] | None = None
        self._rejoin = False  # closed by ``prove``: connect again at once, no warning

    # ---------------------------------------------------------------- lifecycle
    async def __aenter__(self) -> Session:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self, wait: bool = True) -> None:
        """Connect in the background; with ``wait``, until the first ``WELCOME``."""
        self._task = asyncio.create_task(self._run(), name=f"session-{self.name}")
        if not wait:
            return
        self._waited = True
        try:
            if await self.wait_ready(self.connect_timeout):
                return
        finally:
            self._waited = False
        if self.error is not None:
            await self.stop()
            raise self.error
        if not self.ready.is_set():
            await self.stop()
            why = f" (last error: {self.last_error})" if self.last_error else ""
            raise MarketUnreachable(
                f"no market answered at {self.address.room_url} within "
                f"{self.connect_timeout:g} s{why}: is `igora market` running?"
            )

    async def wait_ready(self, timeout: float) -> bool:
        """Whether the first ``WELCOME`` came within ``timeout`` seconds; False as soon as
        the session gave up (refused for good), without waiting the rest."""
        if self.ready.is_set():
            return True
        if self._task is None or self._task.done():
            return False
        ready = asyncio.create_task(self.ready.wait())
        try:
            await asyncio.wait(
                {ready, self._task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            ready.cancel()
        return self.ready.is_set()

    async def stop(self) -> None:
        """End the connection; returns whatever the connection task does
        (``igora.aio.stop_task``: cancelled again if it goes on, at most 3 x 15 s)."""
        if self._task is None:
            return
        task, self._task = self._task, None
        await stop_task(task, f"{self.name}: the session", log)

    # ---------------------------------------------------------------- documents
    def own(self, name: str, new: bool = False) -> Doc[Any]:
        """The ``Doc`` of ``name``, written by this session: every local transaction on it
        goes to the market. ``DocumentError`` if no identity of this session owns it. The
        broker's documents (``in/``, ``board``) go only while this connection holds the
        lease (a ``NOTICE`` 200 grants it; each reconnection loses it).

        The first ``own`` sends a step 1, so that the market sends back what it holds of
        the document; with ``new`` (a task's document made now, under a name never used:
        the market holds nothing of it) that exchange is skipped: its four frames were a
        third of a task's. A reconnection re-syncs it as any other."""
        doc = parse(name)
        if not may_write(doc, self.ids, lease=True):  # the broker's: sent while it holds it
            raise DocumentError(f"{name} is not a document this session owns (ids: {self._who})")
        if name not in self._owned:
            self._owned.add(name)
            if not new and self._sendable(name):
                self._put(self._step1(name))  # the market sends back what it holds of it
        return self._doc(name)

    def subscribe(self, name: str, prefix: bool = False) -> Doc[Any] | None:
        """Read ``name`` (a document), or with ``prefix`` every document whose name starts
        with it (``a/``, ``w/``, ``in/``: brokers only). The document's ``Doc`` (None for a
        prefix); the market's refusal comes as a ``REFUSED`` event."""
        self._check_subscription(name, prefix)
        if self._subs.get(name) is not prefix:
            self._subs[name] = prefix
            self._gone.pop(name, None)
            self._put(encode(Subscribe(((name, prefix),))))
        return None if prefix else self._doc(name)

    def unsubscribe(self, name: str, prefix: bool = False) -> None:
        """Stop reading ``name`` (or the prefix): its ``Doc``s not owned are forgotten."""
        self._check_subscription(name, prefix)
        if self._subs.get(name) is prefix:
            del self._subs[name]
        # Also for a document never subscribed by name: that ends an attachment (§5).
        self._put(encode(Subscribe(((name, prefix),), unsubscribe=True)))
        self._mark_gone(name)
        held = [n for n in self.docs if n.startswith(name)] if prefix else [name]
        for n in held:
            if n not in self._owned and self._subs.get(n) is not False:
                self._forget(n)

    def forget(self, name: str) -> None:
        """Stop holding ``name``: its ``Doc`` is released, nothing is sent."""
        self._owned.discard(name)
        self._subs.pop(name, None)
        self._forget(name)

    def drop(self, name: str) -> None:
        """End a document this session owns (a task's, protocol-v3.md §7: ``CONTROL
        drop``): the market removes it and tells its readers (``NOTICE`` 410). Forgotten
        here at once; sent after the next ``WELCOME`` if not connected now."""
        if name not in self._owned:
            raise DocumentError(f"{name} is not a document this session owns")
        self.forget(name)
        self._mark_gone(name)  # what the market sent of it before the drop: ignored
        self._drops.add(name)
        self._send_drops()

    async def prove(self, identity: Identity) -> bool:
        """Prove ``identity`` too (a gateway's API key's, security.md §7): a handshake
        proves the ids of its connection, so a live connection is made again at once (no
        backoff), and what was written meanwhile goes with the resync that follows every
        ``WELCOME``. Whether a ``WELCOME`` came within ``connect_timeout``; whether the
        market admitted the identity is then in ``granted``."""
        if identity.id in self.ids:
            return self.connected
        self.identities.append(identity)
        self.ids = frozenset(i.id for i in self.identities)
        ws = self._ws
        if ws is None:
            return False  # the next connection proves it
        welcomed = asyncio.Event()

        def seen(event: Event) -> None:
            if event.kind is EventKind.CONNECTED or event.kind is EventKind.FAILED:
                welcomed.set()

        remove = self.observe(seen)
        self._rejoin = True
        try:
            await ws.close(1000, "proving one more identity")
            with contextlib.suppress(asyncio.TimeoutError):
                await within(welcomed.wait(), self.connect_timeout)
        finally:
            remove()
        return self.connected

    def _mark_gone(self, name: str) -> None:
        """Late updates of ``name`` are ignored (the last GONE_KEPT names)."""
        self._gone.pop(name, None)
        self._gone[name] = None
        if len(self._gone) > GONE_KEPT:
            del self._gone[next(iter(self._gone))]

    def replace(self, name: str) -> Doc[Any]:
        """Start a new epoch of ``name``, a long-lived document this session owns
        (protocol-v3.md §9): its ``Doc`` is rebuilt from its live entries alone and sent
        as ``CONTROL replace`` and the new state; the market swaps its log and its
        readers swap their ``Doc``. Done by the session itself after ``REPLACE_AFTER``
        deletions, between two of the owner's transactions; the new ``Doc`` is returned
        (roles read ``docs[name]`` again rather than keep the old one)."""
        if name not in self._owned or name[:2] in ("p/", "r/"):
            raise DocumentError(f"{name} is not a long-lived document this session owns")
        tune_allocator()
        new = fresh(self.docs[name])
        self._release(name)
        self.docs[name] = new
        self._doc_subs[name] = new.observe(lambda event: self._local(name, event))
        self._deleted[name] = 0
        self._replacing.add(name)
        self.replaced += 1
        if self._sendable(name):
            self._send_replace(name)
        release_memory()  # the old Doc's pages, as after a v2 compaction
        log.debug("%s: %s replaced by a new epoch", self.name, name)
        return new

    def _send_replace(self, name: str) -> None:
        """The replace and the whole new state, one after the other on the socket (the
        market takes them in that order)."""
        self._put(encode(Control({"op": "replace", "doc": name})))
        self._put(encode(DocFrame(name, Sync.STEP2, self.docs[name].get_update())))

    def _count_deletions(self, name: str, event: TransactionEvent) -> None:
        """Count what a local transaction deleted in owned ``name``; past
        ``REPLACE_AFTER``, replace it right after this transaction."""
        count = self._deleted.get(name, 0)
        if count < 0:
            return  # a replace is already due
        count += deleted_by(event)
        if count < REPLACE_AFTER:
            self._deleted[name] = count
            return
        self._deleted[name] = -1
        asyncio.get_running_loop().call_soon(self._replace_due, name)

    def _replace_due(self, name: str) -> None:
        if name in self._owned and self._deleted.get(name) == -1:
            self.replace(name)

    def control(self, body: dict[str, Any]) -> bool:
        """Send a ``CONTROL`` (``body["op"]`` names it); False if not connected: roles send
        their controls again on ``CONNECTED``."""
        if not isinstance(body.get("op"), str):
            raise ValueError('a CONTROL needs a string "op"')
        return self._put(encode(Control(body)))

    def set_state(self, **fields: Any) -> None:
        """Change fields of this agent's presence state (what ``who`` shows of it: its
        ``type``, ``name``, ``state``...), sent at once."""
        self.state.update(fields)
        self._put(self._presence())

    # ---------------------------------------------------------------- events
    def observe(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``callback(event)`` for every event; the function returned removes it.
        A callback runs inside the session's reading loop: it may write documents and
        subscribe, not block."""
        self._observers.append(callback)
        return lambda: self._observers.remove(callback) if callback in self._observers else None

    def events(self) -> Events:
        """The events from now on, as an async iterator."""
        return Events(self)

    def _emit(self, kind: EventKind, name: str = "", code: int = 0, text: str = "") -> None:
        event = Event(kind, name, code, text)
        for callback in list(self._observers):
            try:
                callback(event)
            except Exception:  # an observer must never break the connection
                log.exception("%s: event observer failed", self.name)

    # ---------------------------------------------------------------- internals
    @property
    def _who(self) -> str:
        return ", ".join(sorted(i[:8] for i in self.ids))

    def _check_subscription(self, name: str, prefix: bool) -> None:
        if prefix:
            if name not in PREFIXES:
                raise DocumentError(f"{name!r} is not a prefix: one of {', '.join(PREFIXES)}")
        else:
            parse(name)

    def _doc(self, name: str) -> Doc[Any]:
        """The ``Doc`` of ``name``, made if none; observed if owned (its local writes go
        to the market), else not (module docstring)."""
        doc = self.docs.get(name)
        if doc is None:
            doc = self.docs[name] = Doc()
        if name in self._owned and name not in self._doc_subs:
            self._doc_subs[name] = doc.observe(lambda event: self._local(name, event))
        return doc

    def _wanted(self, name: str) -> bool:
        """Whether an update of ``name`` is still for this session: not one of a document
        or prefix unsubscribed from on this connection (an update may cross the UNSUB)."""
        if name in self._owned or name in self._subs:
            return True
        # the prefixes looked up in _gone, not _gone scanned: it holds the documents
        # unsubscribed lately (one per task an asker ran), so scanning it made each
        # frame received cost O(tasks)
        return name not in self._gone and not any(
            name.startswith(p) for p in PREFIXES if p in self._gone
        )

    def _forget(self, name: str) -> None:
        self._release(name)
        self._epochs.pop(name, None)
        self._fresh.discard(name)
        self._deleted.pop(name, None)
        self._replacing.discard(name)

    def _release(self, name: str) -> None:
        """Let go of the ``Doc`` of ``name``."""
        doc = self.docs.pop(name, None)
        sub = self._doc_subs.pop(name, None)
        if doc is not None and sub is not None:
            doc.unobserve(sub)

    def _local(self, name: str, event: TransactionEvent) -> None:
        """A transaction on owned ``name`` (observed only while owned: ``_doc``)."""
        if name == self._applying:
            return  # the market's: not sent back
        if self._sendable(name):
            self._put(encode(DocFrame(name, Sync.UPDATE, event.update)))
        if name[:2] not in ("p/", "r/"):  # long-lived: replaced after many deletions
            self._count_deletions(name, event)

    def _sendable(self, name: str) -> bool:
        """Whether this connection may send ``name`` now (anything else would be closed
        4403): the broker's documents (``in/``, ``board``) only while it holds the lease,
        an identity's only if the ``WELCOME`` granted that identity. What was written
        meanwhile goes with the step 1 exchange that follows the lease's grant."""
        doc = parse(name)
        if doc.owner is Owner.LEASE:
            return self.lease
        return doc.agent in self.granted

    def _resync_owned(self, lease: bool = False) -> None:
        """A step 1 for each owned document this connection may send (with ``lease``:
        only the broker's): the market answers what it has, then asks for what it lacks."""
        for name in sorted(self._owned):
            if self._sendable(name) and (not lease or parse(name).owner is Owner.LEASE):
                if name in self._replacing:  # the market may not have it: again, whole
                    self._send_replace(name)
                else:
                    self._put(self._step1(name))

    def _send_drops(self) -> None:
        for name in sorted(self._drops):
            if self._sendable(name) and self._put(encode(Control({"op": "drop", "doc": name}))):
                self._drops.discard(name)

    def _step1(self, name: str) -> bytes:
        return encode(DocFrame(name, Sync.STEP1, self._doc(name).get_state()))

    def _presence(self) -> bytes:
        return encode(Presence({"state": self.state, "heartbeat": self.heartbeat}))

    def _put(self, frame: bytes) -> bool:
        """Queue ``frame`` on the live connection; False when there is none (what matters
        is sent again after the next WELCOME)."""
        outbox, ws = self._outbox, self._ws
        if outbox is None or ws is None or outbox.closed:
            return False
        self._last_put = asyncio.get_running_loop().time()
        outbox.put(frame)
        if outbox.closed:  # the market did not read 64 MiB: start afresh
            asyncio.get_running_loop().create_task(ws.close())
            return False
        return True

    # ---------------------------------------------------------------- connection
    async def _run(self) -> None:
        backoff = Backoff(self.backoff_max)
        attempt = 0
        urls = self.address.room_urls  # several markets listed: the next after a failure
        while True:
            url = urls[attempt % len(urls)]
            try:
                async with connect(
                    url,
                    subprotocols=[Subprotocol(SUBPROTOCOL)],
                    max_size=None,
                    open_timeout=self.connect_timeout,
                    ping_interval=10,
                    ping_timeout=20,
                ) as ws:
                    await self._connection(ws, backoff, attempt)
            except asyncio.CancelledError:
                raise
            except _BadInput as exc:
                log.warning("%s: %s; reconnecting", self.name, exc)
            except HandshakeError as exc:
                self._fail(BadMarket(f"the market at {url} failed the handshake: {exc}"))
                return
            except (V2Room, Refused, MarketKeyError, KnownMarketsError) as exc:
                self._fail(exc)
                return
            except (OSError, WebSocketException, asyncio.TimeoutError) as exc:
                self.last_error = str(exc) or type(exc).__name__
                log_unreachable(log, self.name, url, exc, backoff.delay, attempt)
            except Exception:
                log.exception("%s: connection error", self.name)
            finally:
                self._disconnected()
            attempt += 1
            if self._rejoin:
                self._rejoin = False
                continue
            await backoff.wait()

    def _fail(self, error: IgoraError) -> None:
        self.error = error
        # Logged as an error unless ``start`` is waiting: it raises the error to its
        # caller then, and a command would print the same sentence twice.
        log.log(logging.DEBUG if self._waited else logging.ERROR, "%s: %s", self.name, error)
        self._emit(EventKind.FAILED, text=str(error))

    def _disconnected(self) -> None:
        if self._outbox is not None:
            self._outbox.close()
        self._outbox = self._ws = None
        self.lease = False
        if self.connected:
            self.connected = False
            self._emit(EventKind.DISCONNECTED)

    async def _connection(self, ws: ClientConnection, backoff: Backoff, attempt: int) -> None:
        url = self.address.room_url
        if ws.subprotocol != SUBPROTOCOL:
            raise V2Room(
                f"the room at {url} speaks Igora protocol 2 (the market did not accept "
                f"the {SUBPROTOCOL} subprotocol): use a v2 agent for it"
            )
        self._denied = ""
        self._pending = []
        try:
            await self._handshake(ws)
            log.log(
                logging.INFO if attempt else logging.DEBUG,
                "%s: %s to %s as %s",
                self.name,
                "reconnected" if attempt else "connected",
                url,
                self._who,
            )
            backoff.reset()
            self._welcomed(ws)
            beat = asyncio.create_task(self._heartbeat_loop())
            try:
                pending, self._pending = self._pending, []
                for frame in pending:
                    self._frame(frame)
                async for message in ws:
                    for frame in self._read(message):
                        self._frame(frame)
            finally:
                beat.cancel()
        except ConnectionClosed as exc:
            closed = exc.rcvd
            code, reason = (closed.code, closed.reason) if closed else (1006, "")
            self._closed(code, reason)
            return
        self._closed(ws.close_code or 1006, ws.close_reason or "")

    def _closed(self, code: int, reason: str) -> None:
        reason = self._denied or reason
        if code == Close.FORBIDDEN and self.connected and len(self.ids) > 1:
            # One of several identities banned or removed (the market closes the whole
            # connection): the next handshake admits the others, or is refused.
            log.warning(
                "%s: market closed the connection (4403: %s); proving the others again",
                self.name,
                reason,
            )
            return
        if code in FATAL_CLOSES:
            raise Refused(self.address.room_url, code, reason)
        if self._rejoin:
            return
        log.warning(
            "%s: market closed the connection (%d%s)",
            self.name,
            code,
            f": {reason}" if reason else "",
        )

    async def _recv(self, ws: ClientConnection, expected: str) -> Auth:
        """The next handshake message; an AUTH DENIED keeps its reason for the close that
        follows. Frames batched behind it wait in ``_pending`` for the WELCOME's end."""
        while True:
            if not self._pending:
                try:
                    message = await within(ws.recv(), self.connect_timeout)
                except asyncio.TimeoutError:
                    raise TimeoutError(
                        f"no {expected} from the market within {self.connect_timeout:g} s"
                    ) from None
                self._pending = self._read(message)
            frame = self._pending.pop(0)
            if isinstance(frame, Auth) and frame.type is AuthType.DENIED:
                assert isinstance(frame.body, str)
                self._denied = frame.body
                continue
            if not isinstance(frame, Auth):
                raise _BadInput(f"the market sent a {type(frame).__name__}, not a {expected}")
            return frame

    async def _handshake(self, ws: ClientConnection) -> None:
        challenge = Challenge.read(await self._recv(ws, "CHALLENGE"))
        url = self.address.url
        if challenge.room != self.address.room:
            raise HandshakeError(
                f"the market answered for room {challenge.room!r}, not {self.address.room!r}"
            )
        known = False
        if self.market_key is not None:
            if challenge.market != self.market_key:
                raise MarketKeyError(
                    f"the market at {url} has the key {challenge.market}, not "
                    f"{self.market_key} as given: refusing to connect"
                )
        else:
            known = known_markets.check(url, challenge.market, self.data)
        response = Response.make(challenge, self.identities, self.invite)
        await ws.send(encode(response.frame()))
        t = transcript(
            challenge.market, challenge.room, challenge.nonce, response.nonce, response.ids
        )
        welcome = Welcome.read(await self._recv(ws, "WELCOME"), challenge, t)
        if self.market_key is None and not known:
            file = known_markets.remember(url, challenge.market, self.data)
            log.info(
                "%s: trusting the market at %s on first use: key %s, kept in %s",
                self.name,
                url,
                challenge.market,
                file,
            )
        self.market = challenge.market
        self.granted = welcome.granted
        self.invite = None  # passed once: the ids it admitted are members now
        refused = sorted(self.ids - set(welcome.granted))
        if refused:
            log.warning(
                "%s: the market admitted %s but not %s: their documents are not sent",
                self.name,
                ", ".join(i[:8] for i in sorted(welcome.granted)) or "no identity",
                ", ".join(i[:8] for i in refused),
            )
        self.limits = welcome.limits

    def _welcomed(self, ws: ClientConnection) -> None:
        """Open the outbox and send, as one batch: presence, every subscription, a step 1
        per owned document."""
        self._ws = ws
        self._outbox = Outbox(self._writer(ws), f"{self.name} -> market", coalesce)
        self._gone.clear()
        self._put(self._presence())
        subs = list(self._subs.items())
        for i in range(0, len(subs), MAX_NAMES):
            self._put(encode(Subscribe(tuple(subs[i : i + MAX_NAMES]))))
        self._resync_owned()
        self._send_drops()
        self.connected = True
        self.ready.set()
        self._emit(EventKind.CONNECTED)

    def _writer(self, ws: ClientConnection) -> Callable[[bytes], Any]:
        async def write(message: bytes) -> None:
            try:
                await ws.send(message)
            except ConnectionClosed:
                pass  # the reading loop sees the close
            except Exception as exc:
                log.warning("%s: could not send to the market (%s)", self.name, exc)
                await ws.close()

        return write

    async def _heartbeat_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            wait = self._last_put + self.heartbeat - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            self._put(self._presence())

    # ---------------------------------------------------------------- reading
    def _read(self, message: str | bytes) -> list[Frame]:
        if isinstance(message, str):
            raise _BadInput("the market sent a text frame")
        try:
            return frames(message)
        except WireError as exc:
            raise _BadInput(f"the market sent a frame that is not v3 ({exc})") from None

    def _frame(self, frame: Frame) -> None:
        if isinstance(frame, DocFrame):
            self._document(frame)
        elif isinstance(frame, Notice):
            self._notice(frame)
        elif isinstance(frame, Auth) and frame.type is AuthType.DENIED:
            assert isinstance(frame.body, str)
            self._denied = frame.body  # a close follows (a ban: 4403)
        else:
            log.warning(
                "%s: ignored a %s frame (not one a market sends)", self.name, type(frame).__name__
            )

    def _document(self, frame: DocFrame) -> None:
        name = frame.name
        try:
            parse(name)
        except DocumentError as exc:
            raise _BadInput(f"the market sent {exc}") from None
        if name in self._replacing:
            return  # of the epoch before the replace the market has not confirmed yet
        if frame.sync is Sync.STEP1:
            if name in self._owned and self._sendable(name):
                self._answer_step1(name, frame.payload)
            else:
                log.debug("%s: ignored a step 1 for %s, not ours", self.name, name)
            return
        if not self._wanted(name):
            if frame.sync is not Sync.STEP2 or name not in self._gone:
                return  # late, after an unsubscription
            # A document's whole state after our UNSUB: the market subscribed us again, as
            # when the broker attaches a task's prompt to the worker it was taken from
            # (re-queued, then given back to it). Ignored, that worker waited for the
            # claim timeout (30 s) per attempt. A STEP2 that crossed our UNSUB is kept
            # too (a Doc no longer updated, until forgotten): rarer, and harmless.
            self._gone.pop(name, None)
        try:
            check_update(frame.payload)
        except UpdateError as exc:
            raise _BadInput(f"the market sent a bad update of {name} ({exc})") from None
        if name in self._fresh:  # (read when the NOTICE came; perhaps owned since)
            self._fresh.discard(name)
            self._release(name)  # the new epoch's state: into a new Doc
        elif frame.sync is Sync.STEP2 and self._market_forgot(name, frame.payload):
            log.info("%s: %s holds what the market no longer has: read afresh", self.name, name)
            self._forget(name)
        new = name not in self.docs
        doc = self._doc(name)
        self._apply(doc, name, frame.payload)
        if new:
            self._emit(EventKind.NEW, name)
        self._emit(EventKind.CHANGED, name)

    def _market_forgot(self, name: str, state: bytes) -> bool:
        """Whether the ``Doc`` held of a document the market writes (``dir``, ``who``,
        ``standing``) has items the market's whole ``state``, sent for a subscription,
        lacks: the market restarted without what it wrote in its last 50 ms (not stored),
        or this session moved to a replica that has not received it yet. Such items stay
        in the copy forever, whatever the market writes next (its later entry for the same
        key loses to the stale one when the old market's client id is the higher), so the
        copy is dropped and read again from ``state``."""
        doc = self.docs.get(name)
        if doc is None or parse(name).owner is not Owner.MARKET:
            return False
        try:
            theirs = state_vector(get_state(state))
        except (UpdateError, ValueError) as exc:
            raise _BadInput(f"the market sent a bad state of {name} ({exc})") from None
        mine = state_vector(doc.get_state())
        return any(clock > theirs.get(client, 0) for client, clock in mine.items())

    def _apply(self, doc: Doc[Any], name: str, update: bytes) -> None:
        self._applying = name
        try:
            doc.apply_update(update)
        except Exception as exc:
            raise _BadInput(f"pycrdt refused an update of {name} from the market ({exc})") from None
        except BaseException as exc:
            if not is_panic(exc):
                raise
            raise _BadInput(f"an update of {name} made pycrdt panic ({exc})") from None
        finally:
            self._applying = None

    def _answer_step1(self, name: str, state: bytes) -> None:
        try:
            diff = self.docs[name].get_update(state)
        except Exception as exc:
            raise _BadInput(f"the market sent a bad state vector for {name} ({exc})") from None
        except BaseException as exc:
            if not is_panic(exc):
                raise
            raise _BadInput(f"a state vector for {name} made pycrdt panic ({exc})") from None
        self._put(encode(DocFrame(name, Sync.STEP2, diff)))

    def _notice(self, notice: Notice) -> None:
        name = notice.doc
        if notice.code == Code.REFUSED:
            log.warning("%s: subscription to %s refused: %s", self.name, name, notice.text)
            prefix = self._subs.pop(name, None)
            if prefix is not None and not prefix and name not in self._owned:
                self._forget(name)
            self._emit(EventKind.REFUSED, name, notice.code, notice.text)
        elif notice.code == Code.DROPPED:
            log.info("%s: %s dropped: %s", self.name, name, notice.text)
            self.forget(name)
            self._emit(EventKind.DROPPED, name, notice.code, notice.text)
        else:
            if notice.code == Code.REPLACED:
                self._replaced(name, notice.text)
            elif notice.code == Code.LEASE_GRANTED:
                self.lease = True
                self._resync_owned(lease=True)
                self._send_drops()
            elif notice.code == Code.LEASE_HELD:
                self.lease = False
            self._emit(EventKind.NOTICE, name, notice.code, notice.text)

    def _replaced(self, name: str, text: str) -> None:
        """A ``NOTICE`` 205: our replace reached the market (an owned document), or the
        document read is at the epoch named: if it is not the one held, the ``Doc`` is
        swapped for a new one when the epoch's state comes (the old one stays readable
        until then)."""
        epoch = epoch_of(text)
        if name in self._owned:
            self._replacing.discard(name)
        elif epoch is not None and self._epochs.get(name, 0) != epoch:
            self._epochs[name] = epoch
            if name in self.docs:
                self._fresh.add(name)
