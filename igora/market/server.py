"""``igora market``: a y-websocket server (pycrdt-websocket) with a durable store.

Any y-websocket client joins a room at ``ws://HOST:PORT/<room>``; rooms are created on
first join and their documents persist in ``DATA/market.sqlite3``. ``GET /`` answers
``Okay`` (as the original public market did) and ``GET /status`` gives a JSON view.

What the market adds to plain pycrdt-websocket:
- every incoming frame is checked before the room sees it (type, framing, awareness
  JSON, every update read whole by ``igora.updates``); an offender is disconnected with a
  log line and nothing of its frame is kept; an update pycrdt panics on all the same
  makes the room rebuild its document from its history (``MarketRoom.receive``);
- the awareness states a connection announced are removed, and the removal broadcast,
  when its socket closes, so the others notice a dead agent at once;
- a newcomer receives the current awareness states on connect;
- limits on message size, on connections (in all and per address), on rooms in memory
  (in all and per address), and a deadline on HTTP request headers;
- finished tasks (entries of ``done``) are copied to the archive as they appear.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import socket
import time
from collections import Counter
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, NamedTuple

from pycrdt import (
    Doc,
    Encoder,
    Map,
    MapEvent,
    TransactionEvent,
    YMessageType,
    YSyncMessageType,
    create_awareness_message,
    create_update_message,
    is_awareness_disconnect_message,
    read_message,
)
from pycrdt.websocket import WebsocketServer, YRoom
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from .. import __version__
from ..header_timeout import DEFAULT_HEADER_TIMEOUT, http_protocol
from ..lib0 import Reader
from ..protocol import FINAL_VALUES, KANBAN, MapName
from ..updates import Parsed, UpdateError, check_update, is_panic
from .causal import MAX_WAITING, CausalGate
from .compaction import compact_doc, release_memory
from .fanout import AwarenessRelay, Outbox
from .store import FLUSH_INTERVAL, SQUASH_AFTER, Store

log = logging.getLogger("igora.market")

DEFAULT_PORT = 1234
DEFAULT_MAX_MESSAGE = 16 * 1024 * 1024
DEFAULT_MAX_CONNECTIONS = 2_000
DEFAULT_MAX_PER_ADDRESS = 500
DEFAULT_COMPACT_EVERY = 500  # finished tasks between two compactions of a room (0: never)
COMPACT_PAUSE = 2.0  # seconds at least between two compactions: the grace of a dead key
DEFAULT_ROOM_IDLE = 60.0  # seconds a room with no connection stays in memory (with a store)
DEFAULT_MAX_ROOMS = 1_000  # rooms in memory; past it the one idle the longest is unloaded
DEFAULT_MAX_ROOMS_PER_ADDRESS = 100  # rooms in memory that one IP address loaded
QUERY_AWARENESS = 3
AUTH = 2


_background: set[asyncio.Task[Any]] = set()


def background(coro: Coroutine[Any, Any, Any]) -> None:
    """Run ``coro`` without awaiting it, keeping a reference until it ends (asyncio only
    keeps weak ones, so an unreferenced task may vanish mid-way)."""
    task = asyncio.get_running_loop().create_task(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)


class BadFrame(ValueError):
    """A frame that breaks the y-websocket protocol; its sender is disconnected."""


MAX_ROOM_NAME = 200
MAX_AWARENESS_ENTRIES = 10_000


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN/Infinity would break JavaScript peers


def awareness_entries(payload: bytes) -> list[tuple[int, int, dict[str, Any] | None]]:
    """Decode an awareness update fully; raise BadFrame on anything malformed."""
    r = Reader(payload, BadFrame)
    n = r.uint()
    if n > MAX_AWARENESS_ENTRIES:
        raise BadFrame("too many awareness entries")
    out = []
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


class Frame(NamedTuple):
    """What ``check_frame`` read of a frame."""

    awareness: list[tuple[int, int, dict[str, Any] | None]]  # of an awareness frame
    update: bytes | None = None  # of a sync step 2 or update frame
    parsed: Parsed | None = None  # what igora.updates read of it


def check_frame(message: bytes) -> Frame:
    """Check one incoming frame; raise BadFrame if it may not reach the room."""
    r = Reader(message, BadFrame)
    kind = r.uint()
    if kind == YMessageType.SYNC:
        step = r.uint()
        if step not in (YSyncMessageType.SYNC_STEP1, YSyncMessageType.SYNC_STEP2,
                        YSyncMessageType.SYNC_UPDATE):
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


class MarketChannel:
    """A Starlette websocket seen as a pycrdt Channel, checking every frame."""

    def __init__(self, websocket: WebSocket, room: str, peer: str) -> None:
        self.websocket = websocket
        self._path = room
        self.peer = peer
        self.controlled: set[int] = set()  # awareness client ids this socket speaks for
        self.owner: int | None = None  # awareness client id of the agent on this socket
        self.closed = False
        self.room: MarketRoom | None = None
        self.outbox = Outbox(self._write, peer)

    @property
    def path(self) -> str:
        return self._path

    def __aiter__(self) -> MarketChannel:
        return self

    async def __anext__(self) -> bytes:
        if self.room is not None:
            self.room.sender = None  # the previous message of this channel is handled
        while True:
            if self.closed:
                raise StopAsyncIteration
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                code = message.get("code")
                if code == 1009:
                    log.warning("%s: disconnected, message over the size limit", self.peer)
                self.closed = True
                self.outbox.close()
                raise StopAsyncIteration
            data = message.get("bytes")
            if data is None:
                await self.reject("text frame (y-websocket speaks binary)")
                raise StopAsyncIteration
            if not data:
                await self.reject("empty frame")
                raise StopAsyncIteration
            try:
                frame = check_frame(data)
            except BadFrame as exc:
                await self.reject(str(exc))
                raise StopAsyncIteration from None
            entries = frame.awareness
            kind = data[0]
            if kind == YMessageType.AWARENESS:
                # An agent's own state is the one it brings into the room: y-websocket
                # clients also re-broadcast the states of others, which are present already.
                first = (self.owner is None and self.room is not None and len(entries) == 1
                         and entries[0][2] is not None
                         and entries[0][0] not in self.room.awareness.states)
                if first:
                    self.owner = entries[0][0]
                if self.room is not None:
                    self.room.claim(self, entries)
                    self.room.relay_awareness(self, data)
                    if first:
                        self.nudge(entries[0][0], entries[0][1])
                    continue
            elif kind == QUERY_AWARENESS:
                if self.room is not None:
                    await self.send_awareness_snapshot(self.room)
                continue
            elif kind == AUTH:
                continue
            elif frame.parsed is not None and frame.update is not None and self.room is not None:
                refusal = self.room.receive(self, frame.update, frame.parsed)
                if refusal is not None:
                    await self.reject(refusal)
                    raise StopAsyncIteration
                continue
            if self.room is not None:
                # The room applies it before this channel reads again (no await between),
                # so the update's fan-out can skip its sender.
                self.room.sender = self
            return data

    async def recv(self) -> bytes:
        return await self.__anext__()

    def nudge(self, client_id: int, clock: int) -> None:
        """Make a (re)joining agent raise its awareness clock, so that everyone takes its
        state.

        A y-websocket client that reconnects (after a network drop, or to a restarted
        market) announces its state again *at the clock it had*, C. Every peer that saw
        C (or the market's removal of the state at C when the old socket closed) ignores
        it, since y-protocols only takes a state with a greater clock: an original agent
        would stay invisible until its next renewal, up to 15 s later. Sending the agent
        alone "your state is removed at C" triggers y-protocols' own rule (never let a
        remote remove the local state): it answers with its state at C + 1, which
        everyone takes. Python agents raise their clock on reconnection anyway; for
        them this is a no-op. Renumbering clocks in the market instead would loop:
        y-websocket clients re-broadcast every change they apply.
        """
        enc = Encoder()
        enc.write_var_uint(1)
        enc.write_var_uint(client_id)
        enc.write_var_uint(clock)
        enc.write_var_string("null")
        self.outbox.put(create_awareness_message(enc.to_bytes()))

    async def send(self, message: bytes) -> None:
        self.outbox.put(message)

    async def _write(self, message: bytes) -> None:
        if self.closed:
            return
        try:
            await self.websocket.send_bytes(message)
        except Exception:
            self.closed = True
            self.outbox.close()

    async def send_awareness_snapshot(self, room: YRoom) -> None:
        ids = [c for c, s in room.awareness.states.items()
               if s and c != room.awareness.client_id and c not in self.controlled]
        if ids:
            await self.send(create_awareness_message(room.awareness.encode_awareness_update(ids)))

    async def reject(self, reason: str) -> None:
        log.warning("%s: disconnected, %s", self.peer, reason)
        self.closed = True
        self.outbox.close()
        with contextlib.suppress(Exception):
            await self.websocket.close(code=1003)


class MarketRoom(YRoom):
    """A room whose document is loaded from, and written to, the store."""

    def __init__(self, name: str, store: Store,
                 compact_every: int = DEFAULT_COMPACT_EVERY) -> None:
        self.name = name
        self.store = store
        self._pending: list[bytes] = []  # applied, not yet handed to the store
        self._writing: list[bytes] = []  # handed to the store, not yet committed
        self._archive: list[dict[str, Any]] = []
        updates = store.load(name)
        doc = self._replay(updates)
        self.gate: CausalGate[tuple[MarketChannel | None, bytes]] = CausalGate(doc.get_state())
        if len(updates) > 1:
            store.replace(name, doc.get_update())
        if updates:
            log.info("room %s: loaded from the store", name)
        super().__init__(ready=True, ydoc=doc, log=logging.getLogger("igora.market.room"))
        self.on_message_error = self._message_error
        self.compact_every = compact_every
        self.compactions = 0
        self._left = 0  # tasks that left the live document since the last compaction
        self._dead: set[str] = set()  # tasks found gone by the last compaction
        self._compactor: asyncio.Task[None] | None = None
        self._store_lock = asyncio.Lock()
        self._observe(doc)
        self._flusher: asyncio.Task[None] | None = None
        self._last_flush = 0.0
        self.holders = 0  # connections using the room (including ones still joining)
        self.idle_since = 0.0
        self.sender: MarketChannel | None = None
        self.controllers: dict[int, MarketChannel] = {}  # awareness client id -> its socket
        self._awareness_relay = AwarenessRelay(lambda: self.clients)

    def _replay(self, updates: list[bytes]) -> Doc:
        """A new document holding a room's history, leaving out any update that fails."""
        doc = Doc()
        for i, update in enumerate(updates):
            try:
                doc.apply_update(update)
            except Exception:
                log.exception("room %s: a stored update could not be applied", self.name)
            except BaseException as exc:
                if not is_panic(exc):
                    raise
                log.error("room %s: a stored update made pycrdt panic; left out", self.name)
                return self._replay(updates[:i] + updates[i + 1:])
        return doc

    def receive(self, channel: MarketChannel | None, update: bytes,
                parsed: Parsed) -> str | None:
        """Take an update a connection sent (checked by ``check_frame``); return why it
        is refused, if it is. An update whose causes the document lacks waits for them
        (``igora.market.causal``)."""
        if not self.gate.ready(parsed):
            if not self.gate.wait(parsed, (channel, update), len(update)):
                return f"{MAX_WAITING} updates wait already for updates that never came"
            return None
        refusal = self._apply(channel, update, parsed)
        for ready, (sender, waited) in self.gate.released():
            late = self._apply(sender, waited, ready)
            if late is not None and sender is not None and not sender.closed:
                background(sender.reject(late))
        return refusal

    def _apply(self, channel: MarketChannel | None, update: bytes, parsed: Parsed) -> str | None:
        """Apply an update; return why it is refused, if it is.

        Should pycrdt panic on it all the same, the document it broke is replaced by one
        rebuilt from the room's history (stored, being stored and pending: every update
        the room applied), and the update is dropped. Applying a copy first would cost a
        copy of the room per update; a panic costs one reload."""
        if update == b"\x00\x00":  # an empty update (y-websocket sends them)
            return None
        if self.gate.splits_a_character(parsed):
            return "refused update: it overlaps the room's clocks up to half a character"
        self.sender = channel  # the fan-out skips it
        try:
            self.ydoc.apply_update(update)
        except Exception as exc:  # noqa: BLE001 (any error of the decoder)
            return f"bad update ({type(exc).__name__}: {exc})"
        except BaseException as exc:
            if not is_panic(exc):
                raise
            history = self.store.load(self.name) + self._writing + self._pending
            self._swap(self._replay(history))
            return f"update made pycrdt panic ({exc}); room {self.name} reloaded"
        finally:
            self.sender = None
        self.gate.applied(parsed)
        return None

    def _observe(self, doc: Doc) -> None:
        for m in KANBAN:
            doc.get(m.value, type=Map)
        doc.get(MapName.STREAMS.value, type=Map)
        self._store_sub = doc.observe(self._on_update)
        # Keep the Map (and its subscription): pycrdt drops the observer of a
        # temporary Map wrapper when it is garbage collected.
        self._done_map = doc.get(MapName.DONE.value, type=Map)
        self._done_sub = self._done_map.observe(self._on_done)

    # Fan-out (see fanout.py): replaces pycrdt-websocket's task per message and receiver.
    async def _watch_ready(self) -> None:
        await self.ready_event.wait()
        self._subscription = self.ydoc.observe(self._fan_out)
        self.ydoc_observed.set()

    async def _broadcast_updates(self) -> None:
        return None  # _fan_out sends as updates are applied

    def _fan_out(self, event: TransactionEvent) -> None:
        # Awareness received before this update goes out before it: agents rely on the
        # order (a worker says "busy" before it hands a task back).
        self._awareness_relay.flush()
        message = create_update_message(event.update)
        for client in self.clients:
            if client is not self.sender:
                client.outbox.put(message)

    def relay_awareness(self, channel: MarketChannel, message: bytes) -> None:
        """Forward an awareness update to everyone (its sender too, as a keep-alive,
        unless it says goodbye) and apply it to the room's view."""
        leaving = is_awareness_disconnect_message(message[1:])
        self._awareness_relay.add(channel, message, message, leaving)  # batched: fanout.py
        self.awareness.apply_awareness_update(read_message(message[1:]), self)

    def _on_update(self, event: TransactionEvent) -> None:
        self._pending.append(event.update)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    def _on_done(self, event: MapEvent) -> None:
        for key, change in event.keys.items():
            action = change.get("action")
            if action == "delete":
                self._left += 1
                continue
            value = change.get("newValue")
            if (self.store.durable and action in ("add", "update") and isinstance(value, dict)
                    and value.get("state") in FINAL_VALUES):
                self._archive.append({**value, "id": value.get("id", key)})
        if self.compact_every and (self._compactor is None or self._compactor.done()):
            self._compactor = asyncio.get_running_loop().create_task(self._compaction_loop())

    async def _compaction_loop(self) -> None:
        """Compact every ``COMPACT_PAUSE`` s while tasks finish: as soon as
        ``compact_every`` tasks have left, or once the flow has paused for a period (two
        quiet compactions leave no tombstone: the first marks, the second collects)."""
        seen = -1
        while self.compact_every and (self._left or self._dead):
            await asyncio.sleep(COMPACT_PAUSE)
            if self._left >= self.compact_every or self._left == seen:
                await self.compact()
            seen = self._left

    async def compact(self) -> None:
        """Replace the room's document by one without the tombstones of finished tasks
        (igora.market.compaction), and store it as the room's whole history.

        The heavy part reads a snapshot in a thread; what arrived meanwhile is applied
        to the new document, which replaces the old one with no await in between.
        Peers keep their own documents: nothing is sent to them."""
        started = time.monotonic()
        self._left = 0
        doc = self.ydoc
        try:
            fresh, result, size = await compact_doc(doc, self._dead)
            if self.ydoc is not doc:
                return
        except BaseException as exc:
            if not isinstance(exc, Exception) and not is_panic(exc):
                raise
            log.exception("room %s: compaction failed; the room goes on, never compacted "
                          "again until the market restarts (please report this)", self.name)
            self.compact_every = 0
            self._dead = set()
            return
        self._swap(fresh)
        del doc, fresh
        release_memory()
        self._dead = result.dead
        self.compactions += 1
        took = time.monotonic() - started
        # A pass that collects nothing only marks the tasks gone since the last one.
        log.log(logging.INFO if result.tasks else logging.DEBUG,
                "room %s: compacted, %d -> %d bytes: the history of %d finished task(s) "
                "collected (%d deleted items) in %.0f ms; %d more next time", self.name,
                size, len(result.update), result.tasks, result.collected, took * 1000,
                len(result.dead))
        async with self._store_lock:
            pending, self._pending = self._pending, []  # the new state holds them
            try:
                await asyncio.to_thread(self.store.replace, self.name, self.ydoc.get_update())
            except Exception:
                self._pending[:0] = pending  # the old history stays; these go after it
                log.exception("room %s: storing the compacted room failed", self.name)

    async def stop(self) -> None:
        if self._compactor is not None:
            self._compactor.cancel()
        await super().stop()

    def _swap(self, doc: Doc) -> None:
        old = self.ydoc
        old.unobserve(self._subscription)
        old.unobserve(self._store_sub)
        self._done_map.unobserve(self._done_sub)
        self.ydoc = doc
        self.gate.reset(doc.get_state())
        self._observe(doc)
        self._subscription = doc.observe(self._fan_out)

    async def _flush_loop(self) -> None:
        """Write pending updates: at once when the store is idle, then at most once per
        ``FLUSH_INTERVAL`` while updates keep coming (a token stream is one write per
        interval, a lone change is on disk a few milliseconds after it arrived)."""
        while self._pending or self._archive:
            wait = self._last_flush + FLUSH_INTERVAL - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._last_flush = time.monotonic()
            try:
                await self.flush()
            except Exception:
                log.exception("room %s: writing to the store failed; retrying", self.name)
                await asyncio.sleep(1.0)

    async def flush(self) -> None:
        async with self._store_lock:
            await self._flush()

    async def _flush(self) -> None:
        updates, self._pending = self._pending, []
        archive, self._archive = self._archive, []
        try:
            if archive:
                await asyncio.to_thread(self.store.archive, self.name, archive)
        except BaseException:
            self._archive[:0] = archive
            self._pending[:0] = updates
            raise
        if not updates:
            return
        self._writing = updates
        try:
            rows = await asyncio.to_thread(self.store.append, self.name, updates)
        except BaseException:
            self._pending[:0] = updates
            raise
        finally:
            self._writing = []
        if rows > SQUASH_AFTER:
            state = self.ydoc.get_update()
            self._pending = []  # the state holds them
            await asyncio.to_thread(self.store.replace, self.name, state)

    def flush_sync(self) -> None:
        if self._archive:
            self.store.archive(self.name, self._archive)
            self._archive = []
        if self._pending:
            self.store.append(self.name, self._pending)
            self._pending = []

    async def _message_error(self, exc: Exception, message: bytes, channel: Any) -> bool:
        peer = getattr(channel, "peer", "?")
        reject = getattr(channel, "reject", None)
        if reject is not None:
            await reject(f"bad update ({type(exc).__name__}: {exc})")
        else:
            log.warning("%s: bad message: %s", peer, exc)
        return True

    def claim(self, channel: MarketChannel, entries: list[tuple[int, int, Any]]) -> None:
        """Record which connection speaks for which awareness client id: the ids it brought
        into the room. A y-websocket client also re-broadcasts the states of others: that
        must not make it their speaker, or its leaving would remove them. (An agent whose
        old socket the market has not yet seen close does not take its id over: when that
        socket closes, the agent hears its state removed and announces it again.)"""
        for client_id, _clock, state in entries:
            holder = self.controllers.get(client_id)
            if state is None:
                if holder is channel:
                    del self.controllers[client_id]
                    channel.controlled.discard(client_id)
            elif holder is None:
                self.controllers[client_id] = channel
                channel.controlled.add(client_id)

    def forget(self, channel: MarketChannel, peer: str) -> None:
        """Remove the awareness states a closed connection spoke for and tell everyone."""
        aw = self.awareness
        for c in channel.controlled:
            if self.controllers.get(c) is channel:
                del self.controllers[c]
        gone = [c for c in channel.controlled if c in aw.states]
        channel.controlled = set()
        if not gone:
            return
        enc = Encoder()
        enc.write_var_uint(len(gone))
        for c in gone:
            enc.write_var_uint(c)
            enc.write_var_uint(int(aw.meta.get(c, {}).get("clock", 0)))
            enc.write_var_string("null")
        aw.remove_awareness_states(gone, "disconnect")
        for c in gone:
            aw.meta.pop(c, None)  # a returning client may reuse its clock
        message = create_awareness_message(enc.to_bytes())
        for client in list(self.clients):
            background(client.send(message))
        log.info("room %s: %s left (%d awareness state(s) removed)", self.name, peer, len(gone))

    def summary(self) -> dict[str, Any]:
        agents = [
            s for c, s in self.awareness.states.items() if s and c != self.awareness.client_id
        ]
        tasks = {m.value: len(self.ydoc.get(m.value, type=Map)) for m in KANBAN}
        return {
            "name": self.name,
            "connections": len(self.clients),
            "agents": agents,
            "tasks": tasks,
            "archived": self.store.archive_count(self.name),
            "compactions": self.compactions,
        }


class MarketServer(WebsocketServer):
    def __init__(self, store: Store, compact_every: int = DEFAULT_COMPACT_EVERY) -> None:
        super().__init__(auto_clean_rooms=False, log=logging.getLogger("igora.market.server"))
        self.store = store
        self.compact_every = compact_every
        self._start_guards: dict[int, asyncio.Lock] = {}

    def room(self, name: str) -> MarketRoom:
        """The room of that name, loaded from the store (not started) if not in memory."""
        if name not in self.rooms:
            self.rooms[name] = MarketRoom(name, self.store, self.compact_every)
        return self.rooms[name]  # type: ignore[return-value]

    async def start_room(self, room: YRoom) -> None:
        """Start a room once, however many connections join it at the same instant.
        (pycrdt-websocket's own start_room lets a second concurrent joiner wait forever
        on the room's start lock, which the first start holds for the room's life.)"""
        if room.started.is_set():
            return
        guard = self._start_guards.setdefault(id(room), asyncio.Lock())
        try:
            async with guard:
                if not room.started.is_set():
                    await super().start_room(room)
        finally:
            if room.started.is_set():
                self._start_guards.pop(id(room), None)

    async def get_room(self, name: str) -> YRoom:
        room = self.room(name)
        await self.start_room(room)
        return room


class Market:
    """The market application: Starlette routes around a MarketServer."""

    def __init__(
        self,
        data: Path | None,
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_per_address: int = DEFAULT_MAX_PER_ADDRESS,
        room_idle: float = DEFAULT_ROOM_IDLE,
        compact_every: int = DEFAULT_COMPACT_EVERY,
        max_rooms: int = DEFAULT_MAX_ROOMS,
        max_rooms_per_address: int = DEFAULT_MAX_ROOMS_PER_ADDRESS,
    ) -> None:
        # Without a folder the rooms' histories are kept in an SQLite database in memory:
        # a room rebuilds its document from it (after a panic, or when it is loaded again).
        self.store = Store(data / "market.sqlite3" if data is not None else ":memory:")
        self.room_idle = room_idle
        self.server = MarketServer(self.store, compact_every)
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self.connections: Counter[str] = Counter()
        self.max_rooms = max_rooms
        self.max_rooms_per_address = max_rooms_per_address
        self.opener: dict[str, str] = {}  # room in memory -> the address that loaded it
        self.opened: Counter[str] = Counter()  # address -> rooms in memory it loaded
        self._refusals: dict[str, tuple[float, int]] = {}
        self.app = Starlette(
            routes=[
                Route("/", self.index),
                Route("/status", self.status),
                Route("/rooms/{room}/tasks/{task_id}", self.archived_task),
                WebSocketRoute("/{room:path}", self.websocket),
            ],
            lifespan=self.lifespan,
        )

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette):  # type: ignore[no-untyped-def]
        async with self.server:
            yield
            for room in list(self.server.rooms.values()):
                if isinstance(room, MarketRoom):
                    room.flush_sync()
        self.store.close()
        if self.store.durable:
            log.info("market stopped, store %s flushed and closed", self.store.path)
        else:
            log.info("market stopped")

    async def index(self, request: Request) -> Response:
        return PlainTextResponse("Okay")

    async def status(self, request: Request) -> Response:
        rooms = [r.summary() for r in self.server.rooms.values() if isinstance(r, MarketRoom)]
        return JSONResponse(
            {
                "status": "ok",
                "version": __version__,
                "connections": sum(self.connections.values()),
                "rooms": rooms,
            }
        )

    async def archived_task(self, request: Request) -> Response:
        room, task_id = request.path_params["room"], request.path_params["task_id"]
        task = self.store.archived(room, task_id)
        if task is None:
            return JSONResponse({"error": f"no archived task {task_id!r} in {room!r}"}, 404)
        return JSONResponse(task)

    async def websocket(self, websocket: WebSocket) -> None:
        room_name = websocket.path_params["room"].strip("/") or "market"
        address = websocket.client.host if websocket.client else "?"
        peer = f"{address}:{websocket.client.port if websocket.client else '?'}"
        refusal = None
        if len(room_name) > MAX_ROOM_NAME or not room_name.isprintable():
            refusal = "room name too long or not printable"
        elif sum(self.connections.values()) >= self.max_connections:
            refusal = f"{self.max_connections} connections already"
        elif self.connections[address] >= self.max_per_address:
            refusal = f"{self.max_per_address} connections from {address} already"
        if refusal is not None:
            self._log_refusal(address, peer, refusal)
            await websocket.close(code=1013)
            return
        self.connections[address] += 1
        channel = MarketChannel(websocket, room_name, peer)
        room: MarketRoom | None = None
        try:
            await websocket.accept()
            refusal = await self._room_refusal(room_name, address)
            if refusal is not None:
                self._log_refusal(address, peer, refusal)
                channel.closed = True
                await websocket.close(code=1013, reason=refusal[:120])
                return
            if room_name not in self.server.rooms:  # no await since the check
                self.opener[room_name] = address
                self.opened[address] += 1
            room = self.server.room(room_name)
            room.holders += 1  # before any await: an idle room is not unloaded under us
            await self.server.start_room(room)
            channel.room = room
            await channel.send_awareness_snapshot(room)
            await room.serve(channel)  # type: ignore[arg-type]
        except WebSocketDisconnect:
            pass
        except Exception:
            log.exception("%s: connection failed", peer)
        finally:
            self.connections[address] -= 1
            if self.connections[address] <= 0:
                del self.connections[address]
            if room is not None:
                room.holders -= 1
                room.forget(channel, peer)
                if room.holders == 0:
                    self._unload_later(room)
            if not channel.closed:
                with contextlib.suppress(Exception):
                    await websocket.close()

    async def _room_refusal(self, name: str, address: str) -> str | None:
        """Why ``address`` may not load room ``name`` into memory now (None: it may, or
        the room is there already). With ``max_rooms`` in memory, the room idle the
        longest is unloaded first to make space; refused only if none is idle."""
        for _ in range(10):
            if name in self.server.rooms:
                return None
            if len(self.server.rooms) < self.max_rooms:
                break
            idle = [r for r in self.server.rooms.values()
                    if isinstance(r, MarketRoom) and r.holders == 0]
            if not idle:
                return f"{self.max_rooms} rooms in memory already, none idle"
            await self._unload(min(idle, key=lambda r: r.idle_since),  # one line each: debug
                               f"to make space ({self.max_rooms} rooms in memory)", logging.DEBUG)
        else:
            return f"{self.max_rooms} rooms in memory already"
        if self.opened[address] >= self.max_rooms_per_address:
            return (f"{self.max_rooms_per_address} rooms opened from {address} are in memory "
                    "already")
        return None

    def _log_refusal(self, address: str, peer: str, reason: str) -> None:
        """One line per address and second at most: a flood must not flood the log too."""
        now = time.monotonic()
        last, hidden = self._refusals.get(address, (0.0, 0))
        if now - last < 1.0:
            self._refusals[address] = (last, hidden + 1)
            return
        more = f" ({hidden} more from {address} in the last second)" if hidden else ""
        log.warning("%s: refused, %s%s", peer, reason, more)
        self._refusals[address] = (now, 0)
        if len(self._refusals) > 10_000:
            self._refusals.clear()

    def _unload_later(self, room: MarketRoom) -> None:
        """Drop a room nobody uses from memory after ``room_idle`` s; it stays in the store
        (in memory without --data, where its history takes less than its live document)."""
        room.idle_since = time.monotonic()
        asyncio.get_running_loop().call_later(
            self.room_idle, lambda: background(self._unload_if_idle(room)))

    async def _unload_if_idle(self, room: MarketRoom) -> None:
        if room.holders or self.server.rooms.get(room.name) is not room:
            return
        if time.monotonic() - room.idle_since < self.room_idle * 0.99:
            return  # someone came and went since: a later call decides
        await self._unload(room, f"after {self.room_idle:g} s without connections")

    async def _unload(self, room: MarketRoom, why: str, level: int = logging.INFO) -> None:
        """Drop an idle room from memory (its history is in the store)."""
        await room.flush()
        if room.holders or room._pending or self.server.rooms.get(room.name) is not room:
            return
        del self.server.rooms[room.name]  # no await between the check and this
        address = self.opener.pop(room.name, None)
        if address is not None:
            self.opened[address] -= 1
            if self.opened[address] <= 0:
                del self.opened[address]
        with contextlib.suppress(Exception):
            await room.stop()
        log.log(level, "room %s: unloaded from memory %s", room.name, why)


def _check_limits(port: int, max_message: int, max_connections: int,
                  max_per_address: int, room_idle: float, compact_every: int = 0,
                  max_rooms: int = 1, max_rooms_per_address: int = 1,
                  header_timeout: float = 1.0) -> None:
    from ..config import ConfigError

    if not 0 < port < 65536:
        raise ConfigError(f"--port {port} is not a TCP port (1-65535)")
    for flag, seconds in (("--room-idle", room_idle), ("--header-timeout", header_timeout)):
        if not 0 < seconds < float("inf"):
            raise ConfigError(f"{flag} must be a positive number of seconds, not {seconds}")
    for flag, value, least in (("--max-message", max_message, 1024),
                               ("--max-connections", max_connections, 1),
                               ("--max-per-address", max_per_address, 1),
                               ("--compact-every", compact_every, 0),
                               ("--max-rooms", max_rooms, 1),
                               ("--max-rooms-per-address", max_rooms_per_address, 1)):
        if value < least:
            raise ConfigError(f"{flag} must be at least {least}, not {value}")


def _listen(host: str, port: int) -> socket.socket:
    """Bind the listening socket ourselves, so that a busy port is a one-line error."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise OSError(f"cannot listen on {host!r}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise OSError(f"port {port} on {host} is in use (another market is running? "
                          "choose another with --port)") from None
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


def _peer_of(protocol: Any) -> str:
    client = getattr(protocol, "client", None)
    return f"{client[0]}:{client[1]}" if client else "?"


class _QuietInvalidRequest(logging.Filter):
    """uvicorn's own line for a bad request says neither who nor why: ours replaces it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "Invalid HTTP request received."


def _protocols(header_timeout: float, max_per_address: int) -> dict[str, Any]:
    """uvicorn's HTTP and websocket protocols, logging who sent garbage before the
    websocket handshake (the ASGI app never sees those connections), and closing
    requests whose headers are late (igora.header_timeout)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol
    from uvicorn.protocols.websockets.auto import AutoWebSocketsProtocol

    out: dict[str, Any] = {}
    http: type[asyncio.Protocol] = AutoHTTPProtocol
    if hasattr(AutoHTTPProtocol, "send_400_response"):

        class HTTP(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
            def send_400_response(self, msg: str) -> None:
                log.warning("%s: disconnected, invalid HTTP request", _peer_of(self))
                super().send_400_response(msg)

        http = HTTP
        logging.getLogger("uvicorn.error").addFilter(_QuietInvalidRequest())
    out["http"] = http_protocol(http, header_timeout, log, max_per_address)
    if AutoWebSocketsProtocol is not None and hasattr(AutoWebSocketsProtocol, "handle_connect"):

        class WS(AutoWebSocketsProtocol):  # type: ignore[misc, valid-type]
            def handle_connect(self, event: Any) -> None:
                super().handle_connect(event)
                status = getattr(getattr(self, "response", None), "status_code", 101)
                if status != 101:
                    log.warning("%s: disconnected, bad websocket handshake (HTTP %s)",
                                _peer_of(self), status)

        out["ws"] = WS
    return out


def run_market(
    host: str,
    port: int,
    data: Path | None,
    *,
    max_message: int = DEFAULT_MAX_MESSAGE,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    max_per_address: int = DEFAULT_MAX_PER_ADDRESS,
    room_idle: float = DEFAULT_ROOM_IDLE,
    compact_every: int = DEFAULT_COMPACT_EVERY,
    max_rooms: int = DEFAULT_MAX_ROOMS,
    max_rooms_per_address: int = DEFAULT_MAX_ROOMS_PER_ADDRESS,
    header_timeout: float = DEFAULT_HEADER_TIMEOUT,
    log_level: str = "info",
) -> None:
    """Serve the market until interrupted (SIGINT/SIGTERM flush the store and exit)."""
    import uvicorn

    _check_limits(port, max_message, max_connections, max_per_address, room_idle,
                  compact_every, max_rooms, max_rooms_per_address, header_timeout)
    # pycrdt-websocket logs every message at DEBUG: keep our own debug lines readable.
    for noisy in ("igora.market.room", "igora.market.server"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, logging.getLogger().level))
    sock = _listen(host, port)
    market = Market(data, max_connections=max_connections, max_per_address=max_per_address,
                    room_idle=room_idle, compact_every=compact_every, max_rooms=max_rooms,
                    max_rooms_per_address=max_rooms_per_address)
    where = f"storing rooms in {data}" if data else "in memory only (no --data)"
    log.info("market listening on ws://%s:%d, %s; limits: message %d bytes, %d connections "
             "(%d per address), %d rooms (%d per address), headers within %g s", host, port,
             where, max_message, max_connections, max_per_address, max_rooms,
             max_rooms_per_address, header_timeout)
    config = uvicorn.Config(
        market.app,
        ws_max_size=max_message,
        ws_ping_interval=10,
        ws_ping_timeout=20,
        # No permessage-deflate: every frame goes to every agent and each connection
        # would compress it again with its own context; at 1,000 agents that was 40 %
        # of the market's time (docs/benchmarks.md). Frames are Yjs binary updates.
        ws_per_message_deflate=False,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=2,
        log_config=None,  # uvicorn's lines go through our format (igora.cli.setup_logging)
        **_protocols(header_timeout, max_per_address),
    )
    uvicorn.Server(config).run(sockets=[sock])
