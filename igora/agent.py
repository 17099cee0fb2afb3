"""The runtime every Igora role builds on: one shared document, one awareness state,
one websocket to the market that reconnects by itself.

Liveness: every agent refreshes its awareness state every ``heartbeat`` seconds
(default 5) and advertises that period in the field ``heartbeat``. A peer is *stale*
when nothing was heard from it for 3 heartbeats (30 s for an original agent, the
y-protocols awareness timeout). The market also removes the awareness state of a
connection as soon as its socket closes, so a killed process is noticed at once.

Memory: the document, its observers and its compaction are the agent's ``Replica``
(igora.replica): a process connected for months holds the live tasks, not every task it
ever saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from pycrdt import (
    Awareness,
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

from .aio import stop_task, within
from .config import MarketAddress
from .errors import MarketUnreachable
from .protocol import PROTOCOL_VERSION, AgentField, Peer, new_id, now_ms
from .reconnect import BACKOFF_MAX, BACKOFF_START, Backoff, log_unreachable
from .replica import COMPACT_EVERY, KeyChanges, Observer, Replica, discard
from .updates import check_update, is_panic

__all__ = [
    "BACKOFF_MAX",
    "BACKOFF_START",
    "COMPACT_EVERY",
    "DEFAULT_HEARTBEAT",
    "ORIGINAL_TIMEOUT",
    "Agent",
    "KeyChanges",
    "Observer",
    "discard",
]

DEFAULT_HEARTBEAT = 5.0
ORIGINAL_TIMEOUT = 30.0  # y-protocols' awareness outdated timeout

log = logging.getLogger("igora.agent")
_UPDATE_PREFIX = bytes([YMessageType.SYNC, YSyncMessageType.SYNC_UPDATE])


class _Resync(Exception):
    """A sync message from the market was dropped: reconnect and sync afresh."""


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


class Agent(Replica):
    """A connection to one market room.

    Use as ``async with Agent(address, type=..., name=...) as agent:``; on enter it
    waits until the document is synced with the market. The document, its maps, observers
    and compaction are the ``Replica`` it builds on. When the connection drops it
    reconnects by itself: first after ``BACKOFF_START`` s, then doubling up to
    ``backoff_max`` s, each delay with +/-20 % jitter. An address listing several
    replicas of the market: the agent starts on one at random (so agents spread) and
    moves to the next one whenever a connection fails or drops; the delay doubles once
    per full round of the list.
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
        self._urls = address.room_urls
        self._at = random.randrange(len(self._urls))  # the replica in use
        self.id = new_id()
        self.heartbeat = heartbeat
        self.connect_timeout = connect_timeout
        self.backoff_max = backoff_max
        self.synced = asyncio.Event()
        # the delay before the next reconnection: back to BACKOFF_START once the market
        # answers a connection's sync, not when a socket merely opened (a market that
        # closes at once, a room limit or a v3 room, is retried ever more slowly)
        self._backoff = Backoff(backoff_max)
        self.connected = False
        self.connected_at = time.monotonic()
        self.last_error: str | None = None
        self._outbox: asyncio.Queue[bytes] | None = None
        self._applying_remote = False
        self._task: asyncio.Task[None] | None = None
        self._listeners: list[Callable[[], None]] = []
        super().__init__(name, logging.getLogger(f"igora.{type}"), self.id, compact_every)
        self.awareness = Awareness(self.doc)
        self.awareness.set_local_state(
            {
                AgentField.ID: self.id,
                AgentField.NAME: name,
                AgentField.TYPE: type,
                AgentField.STYLE: style,
                AgentField.STATE: state,
                AgentField.DATE: now_ms(),
                AgentField.PROTOCOL: PROTOCOL_VERSION,
                AgentField.HEARTBEAT: heartbeat,
                AgentField.SINCE: now_ms(),
                **(fields or {}),
            }
        )
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
                await within(self.synced.wait(), self.connect_timeout)
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
        await stop_task(task, f"{self.name}: the agent", self.log)
        self._stop_compacting()

    # ---------------------------------------------------------------- document
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
        state[AgentField.DATE] = now_ms()
        self.awareness.set_local_state(state)

    def _on_awareness(self, topic: str, change: tuple[dict[str, Any], Any]) -> None:
        changes, origin = change
        if (
            topic == "update"
            and origin != "local"
            and self.awareness.client_id in changes.get("removed", ())
            and self.awareness.get_local_state() is not None
        ):
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
        last = float(meta.get("lastUpdated", 0))
        hb = state.get(AgentField.HEARTBEAT)
        limit = 3 * float(hb) if isinstance(hb, (int, float)) and 0 < hb < 600 else ORIGINAL_TIMEOUT
        return now - last > limit * 1000

    # ---------------------------------------------------------------- connection
    @property
    def url(self) -> str:
        """The room URL this agent uses (or tries) now."""
        return self._urls[self._at]

    async def _run(self) -> None:
        backoff = self._backoff
        attempt = 0
        tried = 0  # replicas tried since the delay last doubled
        while True:
            url = self.url
            try:
                async with connect(
                    url,
                    max_size=None,
                    open_timeout=self.connect_timeout,
                    ping_interval=10,
                    ping_timeout=20,
                ) as ws:
                    if attempt:
                        self.log.info("%s reconnected to %s", self.name, url)
                    else:
                        self.log.debug("%s connected to %s", self.name, url)
                    tried = 0
                    await self._session(ws)
                self.log.warning("%s: market %s closed the connection", self.name, url)
            except asyncio.CancelledError:
                raise
            except _Resync:
                backoff.reset()  # logged already; the sync of a new session repairs
            except (OSError, WebSocketException, asyncio.TimeoutError) as exc:
                self.last_error = str(exc) or type(exc).__name__
                log_unreachable(self.log, self.name, url, exc, backoff.delay, attempt)
            except Exception:
                self.log.exception("%s: connection error", self.name)
            finally:
                self.connected = False
            attempt += 1
            self._at = (self._at + 1) % len(self._urls)  # the next replica, if several
            tried += 1
            await backoff.wait(grow=tried >= len(self._urls))  # doubles once per round
            if tried >= len(self._urls):
                tried = 0

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
            except Exception as exc:  # malformed: UpdateError, pycrdt's own
                self.log.warning(
                    "%s: dropped a sync message from the market (%s); resyncing", self.name, exc
                )
                raise _Resync from None
            except BaseException as exc:
                if not is_panic(exc):
                    raise
                self.log.error(
                    "%s: a sync message from the market made pycrdt panic (%s); dropped, resyncing",
                    self.name,
                    exc,
                )
                raise _Resync from None
            finally:
                self._applying_remote = False
            if message[1] == YSyncMessageType.SYNC_STEP2:
                self._backoff.reset()  # the market answered: this connection is made
                if not self.synced.is_set():
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
