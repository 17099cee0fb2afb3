"""The runtime every Igora role builds on: one shared document, one awareness state,
one websocket to the market that reconnects by itself.

Liveness: every agent refreshes its awareness state every ``heartbeat`` seconds
(default 5) and advertises that period in the field ``heartbeat``. A peer is *stale*
when nothing was heard from it for 3 heartbeats (30 s for an original agent, the
y-protocols awareness timeout). The market also removes the awareness state of a
connection as soon as its socket closes, so a killed process is noticed at once.

Memory: every agent compacts its own document as the market compacts its rooms
(``Agent.compact``, docs/faults.md "Agents that run for months"), so a process connected
for months holds the live tasks, not every task it ever saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pycrdt import (
    Awareness,
    Doc,
    Map,
    TransactionEvent,
    YMessageType,
    YSyncMessageType,
    create_awareness_message,
    create_sync_message,
    create_update_message,
    handle_sync_message,
    merge_updates,
    read_message,
)
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException

from .config import MarketAddress
from .errors import MarketUnreachable
from .market.compaction import compact_doc, release_memory
from .protocol import A, KANBAN, PROTOCOL_VERSION, MapName, Peer, new_id, now_ms
from .updates import check_update, is_panic

DEFAULT_HEARTBEAT = 5.0
ORIGINAL_TIMEOUT = 30.0  # y-protocols' awareness outdated timeout
BACKOFF_START = 0.2
BACKOFF_MAX = 5.0
COMPACT_EVERY = 500  # tasks gone from ``done`` between two compactions of the document
COMPACT_PAUSE = 2.0  # seconds at least between two: the grace of a task gone (as the market)

log = logging.getLogger("igora.agent")
_UPDATE_PREFIX = bytes([YMessageType.SYNC, YSyncMessageType.SYNC_UPDATE])


class _Resync(Exception):
    """A sync message from the market was dropped: reconnect and sync afresh."""


def discard(mp: Map, key: str) -> None:
    """Delete ``key`` from ``mp`` if there. ``Map.pop`` reads (and converts) the value
    first, a task-sized dict each time."""
    if key in mp:
        del mp[key]


@dataclass(eq=False)
class Observer:
    """An observer of one top-level map, kept by the agent across document rebuilds."""

    name: MapName
    callback: Callable[[Any], None]
    deep: bool
    subscription: Any = None


def _merge_update_runs(batch: list[bytes]) -> list[bytes]:
    """``batch`` in order, each run of consecutive document updates merged into one."""
    out: list[bytes] = []
    run: list[bytes] = []

    def close_run() -> None:
        if len(run) > 1:
            out.append(create_update_message(merge_updates(*(read_message(m[2:]) for m in run))))
        else:
            out.extend(run)
        run.clear()

    for message in batch:
        if message[:2] == _UPDATE_PREFIX:
            run.append(message)
        else:
            close_run()
            out.append(message)
    close_run()
    return out


class Agent:
    """A connection to one market room.

    Use as ``async with Agent(address, type=..., name=...) as agent:``; on enter it
    waits until the document is synced with the market. When the connection drops it
    reconnects by itself: first after ``BACKOFF_START`` s, then doubling up to
    ``backoff_max`` s, each delay with +/-20 % jitter.
    """

    def __init__(
        self,
        address: MarketAddress,
        *,
        type: str,
        name: str,
        style: str,
        state: str = "ready",
        fields: dict[str, Any] | None = None,
        heartbeat: float = DEFAULT_HEARTBEAT,
        connect_timeout: float = 10.0,
        backoff_max: float = BACKOFF_MAX,
        compact_every: int = COMPACT_EVERY,
    ) -> None:
        self.address = address
        self.id = new_id()
        self.name = name
        self.heartbeat = heartbeat
        self.connect_timeout = connect_timeout
        self.backoff_max = backoff_max
        self.log = logging.getLogger(f"igora.{type}")
        self.doc = Doc()
        self.maps: dict[MapName, Map] = {}
        self._bind_maps()
        self.awareness = Awareness(self.doc)
        self.awareness.set_local_state(
            {
                A.ID: self.id,
                A.NAME: name,
                A.TYPE: type,
                A.STYLE: style,
                A.STATE: state,
                A.DATE: now_ms(),
                A.PROTOCOL: PROTOCOL_VERSION,
                A.HEARTBEAT: heartbeat,
                A.SINCE: now_ms(),
                **(fields or {}),
            }
        )
        self.synced = asyncio.Event()
        self.connected = False
        self.connected_at = time.monotonic()
        self.last_error: str | None = None
        self._outbox: asyncio.Queue[bytes] | None = None
        self._applying_remote = False
        self._task: asyncio.Task[None] | None = None
        self._listeners: list[Callable[[], None]] = []
        self._observers: list[Observer] = []
        self.compact_every = compact_every
        self.compactions = 0
        self.collected = 0  # finished tasks whose history the compactions dropped
        self._left = 0  # tasks gone from done since the last compaction
        self._dead: set[str] = set()  # tasks found gone by the last compaction
        self._compactor: asyncio.Task[None] | None = None
        self._doc_subscription = self.doc.observe(self._on_doc_update)
        self.observe_keys(MapName.DONE, self._on_done_keys)
        self.awareness.observe(self._on_awareness)

    # ---------------------------------------------------------------- lifecycle
    async def __aenter__(self) -> Agent:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self, wait: bool = True) -> None:
        self._outbox = asyncio.Queue()
        self._task = asyncio.create_task(self._run(), name=f"agent-{self.name}")
        if wait:
            try:
                await asyncio.wait_for(self.synced.wait(), self.connect_timeout)
            except asyncio.TimeoutError:
                await self.stop()
                why = f" (last error: {self.last_error})" if self.last_error else ""
                raise MarketUnreachable(
                    f"no market answered at {self.address.room_url} within "
                    f"{self.connect_timeout:g} s{why}: is `igora market` (or `igora up`) "
                    "running?"
                ) from None

    async def stop(self) -> None:
        if self._task is None:
            return
        task, self._task = self._task, None
        # Say goodbye so the others notice at once, then close.
        with contextlib.suppress(Exception):
            self.awareness.set_local_state(None)
            await asyncio.sleep(0.05)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        if self._compactor is not None:
            self._compactor.cancel()
            self._compactor = None

    # ---------------------------------------------------------------- document
    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        with self.doc.transaction(origin=self.id):
            yield

    def observe_keys(self, name: MapName,
                     callback: Callable[[dict[str, dict[str, Any]]], None]) -> Observer:
        """Call ``callback(changes)`` after each transaction that changes the map ``name``;
        ``changes`` maps each changed key to ``{"action": "add" | "update" | "delete",
        "oldValue": ..., "newValue": ...}``. Cheaper than ``Map.observe``, which builds an
        event object and walks every value again (~20 us per task-sized change, paid by
        every agent for every change of the room). The callback must not read or write
        the document (it runs inside the transaction). It follows the agent's document
        across rebuilds (``compact``); ``unobserve`` ends it."""
        return self._observe(Observer(name, callback, deep=False))

    def observe_deep(self, name: MapName, callback: Callable[[list[Any]], None]) -> Observer:
        """``Map.observe_deep`` on the map ``name`` (pycrdt events: the Y.Text pieces of
        ``streams``), following the agent's document across rebuilds."""
        return self._observe(Observer(name, callback, deep=True))

    def unobserve(self, observer: Observer) -> None:
        if observer in self._observers:
            self._observers.remove(observer)
            self._unsubscribe(observer)

    def _observe(self, observer: Observer) -> Observer:
        self._observers.append(observer)
        self._subscribe(observer)
        return observer

    def _subscribe(self, observer: Observer) -> None:
        name, callback = observer.name, observer.callback

        def call(event: Any) -> None:
            try:
                callback(event if observer.deep else event.keys)
            except Exception:  # an observer must never break the connection
                self.log.exception("observer of %s failed", name.value)

        mp = self.maps[name]
        observer.subscription = mp.observe_deep(call) if observer.deep else mp.integrated.observe(call)

    def _unsubscribe(self, observer: Observer) -> None:
        if observer.subscription is not None:
            if observer.deep:
                self.maps[observer.name].unobserve(observer.subscription)
            else:
                observer.subscription.drop()
            observer.subscription = None

    def _bind_maps(self) -> None:
        for m in (*KANBAN, MapName.STREAMS):
            self.maps[m] = self.doc.get(m.value, type=Map)

    # ---------------------------------------------------------------- compaction
    def _on_done_keys(self, changes: dict[str, dict[str, Any]]) -> None:
        self._left += sum(1 for c in changes.values() if c.get("action") == "delete")
        if (self._left and self.compact_every
                and (self._compactor is None or self._compactor.done())):
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # a document used outside a loop: nothing to schedule
                return
            self._compactor = loop.create_task(self._compaction_loop())

    async def _compaction_loop(self) -> None:
        """Compact every ``COMPACT_PAUSE`` s while tasks leave: as soon as
        ``compact_every`` have left, or once the flow has paused for a period (the first
        quiet pass marks the tasks gone, the second collects them)."""
        seen = -1
        while self.compact_every and (self._left or self._dead):
            await asyncio.sleep(COMPACT_PAUSE)
            if self._left >= self.compact_every or self._left == seen:
                await self.compact()
            seen = self._left

    async def compact(self) -> None:
        """Replace the agent's document by one without the history of finished tasks,
        as the market does with its rooms (igora.market.compaction): the rewrite runs in a
        thread on a snapshot; what arrived meanwhile is applied to the new document, which
        is swapped in, with every observer moved to it, with no await in between. The
        state vector is unchanged (collected items become GC ranges of the same clocks):
        the session with the market goes on as before, nothing is sent."""
        self._left = 0
        doc = self.doc
        started = time.monotonic()
        try:
            fresh, result, size = await compact_doc(doc, self._dead)
        except Exception:
            self.log.exception("%s: compacting the document failed; not compacted again "
                               "(please report this)", self.name)
            self.compact_every = 0
            self._dead = set()
            return
        if self.doc is not doc:
            return
        self._swap(fresh)
        del doc, fresh
        release_memory()
        self._dead = result.dead
        self.compactions += 1
        self.collected += result.tasks
        self.log.log(logging.INFO if result.tasks else logging.DEBUG,
                     "%s: document compacted, %d -> %d bytes: the history of %d finished "
                     "task(s) collected in %.0f ms", self.name, size, len(result.update),
                     result.tasks, (time.monotonic() - started) * 1000)

    def _swap(self, fresh: Doc) -> None:
        """Move to ``fresh``: nothing of the old document is used after this (pycrdt
        objects of a dropped document must not be touched, and nothing keeps it alive)."""
        for observer in self._observers:
            self._unsubscribe(observer)
        self.doc.unobserve(self._doc_subscription)
        self.doc = fresh
        self._bind_maps()
        self._doc_subscription = fresh.observe(self._on_doc_update)
        for observer in self._observers:
            self._subscribe(observer)

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (no argument, must not write) after any document or awareness
        change, local or remote."""
        self._listeners.append(callback)

    def _notify(self) -> None:
        for cb in self._listeners:
            try:
                cb()
            except Exception:  # a listener must never break the connection
                self.log.exception("change listener failed")

    def _on_doc_update(self, event: TransactionEvent) -> None:
        if not self._applying_remote and self._outbox is not None and self.connected:
            self._outbox.put_nowait(create_update_message(event.update))
        self._notify()

    # ---------------------------------------------------------------- awareness
    @property
    def local_state(self) -> dict[str, Any]:
        return dict(self.awareness.get_local_state() or {})

    def set_state(self, **fields: Any) -> None:
        """Update fields of this agent's awareness state (and its ``date``)."""
        state = self.local_state
        state.update(fields)
        state[A.DATE] = now_ms()
        self.awareness.set_local_state(state)

    def _on_awareness(self, topic: str, change: tuple[dict[str, Any], Any]) -> None:
        changes, origin = change
        if (topic == "update" and origin != "local" and self.awareness.client_id in
                changes.get("removed", ()) and self.awareness.get_local_state() is not None):
            # Someone (the market, when an old socket of ours closed) removed our state:
            # say we are here, with a greater clock, as y-protocols peers do.
            self.set_state()
            return
        if topic == "update" and origin == "local" and self._outbox is not None and self.connected:
            ids = [c for v in changes.values() for c in v]
            update = self.awareness.encode_awareness_update(ids)
            self._outbox.put_nowait(create_awareness_message(update))
        if topic == "change":
            self._notify()

    def peers(self, include_stale: bool = False) -> list[Peer]:
        """Other agents in the room, fresh ones only unless asked."""
        now = time.time() * 1000
        out = []
        for client_id, state in list(self.awareness.states.items()):
            if client_id == self.awareness.client_id or not isinstance(state, dict) or not state:
                continue
            if not include_stale and self.is_stale(client_id, state, now):
                continue
            out.append(Peer(client_id, state))
        return out

    def is_stale(self, client_id: int, state: dict[str, Any], now: float | None = None) -> bool:
        now = time.time() * 1000 if now is None else now
        meta = self.awareness.meta.get(client_id) or {}
        last = meta.get("lastUpdated", 0)
        hb = state.get(A.HEARTBEAT)
        limit = 3 * float(hb) if isinstance(hb, (int, float)) and 0 < hb < 600 else ORIGINAL_TIMEOUT
        return now - last > limit * 1000

    # ---------------------------------------------------------------- connection
    async def _run(self) -> None:
        delay = BACKOFF_START
        attempt = 0
        while True:
            try:
                async with connect(
                    self.address.room_url,
                    max_size=None,
                    open_timeout=self.connect_timeout,
                    ping_interval=10,
                    ping_timeout=20,
                ) as ws:
                    if attempt:
                        self.log.info("%s reconnected to %s", self.name, self.address.room_url)
                    else:
                        self.log.debug("%s connected to %s", self.name, self.address.room_url)
                    delay = BACKOFF_START
                    await self._session(ws)
                self.log.warning("%s: market closed the connection", self.name)
            except asyncio.CancelledError:
                raise
            except _Resync:
                delay = BACKOFF_START  # logged already; the sync of a new session repairs
            except (OSError, WebSocketException, asyncio.TimeoutError) as exc:
                self.last_error = str(exc) or type(exc).__name__
                level = logging.WARNING if attempt else logging.DEBUG
                self.log.log(level, "%s: market %s unreachable (%s); retrying in %.1f s",
                             self.name, self.address.room_url, exc or type(exc).__name__, delay)
            except Exception:
                self.log.exception("%s: connection error", self.name)
            finally:
                self.connected = False
            attempt += 1
            await asyncio.sleep(delay * (0.8 + 0.4 * random.random()))
            delay = min(delay * 2, self.backoff_max)

    async def _session(self, ws: ClientConnection) -> None:
        assert self._outbox is not None
        # Drop what was queued while offline: the sync below sends the whole difference.
        while not self._outbox.empty():
            self._outbox.get_nowait()
        self.connected = True
        self.connected_at = time.monotonic()
        await ws.send(create_sync_message(self.doc))
        local = self.awareness.get_local_state()
        if local is not None:
            self.set_state()  # bump clock so the market takes it even after a restart
        sender = asyncio.create_task(self._send_loop(ws))
        beat = asyncio.create_task(self._heartbeat_loop())
        try:
            async for message in ws:
                if isinstance(message, str) or not message:
                    continue
                reply = self._handle(message)
                if reply is not None:
                    await ws.send(reply)
        finally:
            sender.cancel()
            beat.cancel()

    def _handle(self, message: bytes) -> bytes | None:
        kind = message[0]
        if kind == YMessageType.SYNC:
            self._applying_remote = True
            try:
                if len(message) > 1 and message[1] != YSyncMessageType.SYNC_STEP1:
                    check_update(read_message(message[2:]))
                reply = handle_sync_message(message[1:], self.doc)
            except Exception as exc:  # noqa: BLE001 (malformed: UpdateError, pycrdt's own)
                self.log.warning("%s: dropped a sync message from the market (%s); "
                                 "resyncing", self.name, exc)
                raise _Resync from None
            except BaseException as exc:
                if not is_panic(exc):
                    raise
                self.log.error("%s: a sync message from the market made pycrdt panic (%s); "
                               "dropped, resyncing", self.name, exc)
                raise _Resync from None
            finally:
                self._applying_remote = False
            if message[1] == YSyncMessageType.SYNC_STEP2 and not self.synced.is_set():
                self.synced.set()
            return reply
        if kind == YMessageType.AWARENESS:
            self.awareness.apply_awareness_update(read_message(message[1:]), "remote")
        return None

    async def _send_loop(self, ws: ClientConnection) -> None:
        assert self._outbox is not None
        while True:
            batch = [await self._outbox.get()]
            while not self._outbox.empty():
                batch.append(self._outbox.get_nowait())
            # Transactions made in one turn of the loop (a broker's assignments, a
            # worker's several tasks ending, a client's answers read) go out as one
            # update: one frame to send, one update for the market to apply and relay.
            for message in _merge_update_runs(batch) if len(batch) > 1 else batch:
                await ws.send(message)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat)
            if self.awareness.get_local_state() is not None:
                self.set_state()
