"""The rooms in memory: loaded from the store on first join, unloaded when idle.

``MarketServer`` is pycrdt-websocket's ``WebsocketServer`` holding ``MarketRoom``s. A room
nobody uses stays in memory ``room_idle`` seconds, then is unloaded (its history stays in
the store). At most ``max_rooms`` are in memory: to load one more, the room idle the
longest is unloaded first; and one IP address may have loaded at most
``max_rooms_per_address`` of those in memory. With ``replicas`` (``igora market --redis``)
a room joins the other replicas once started and leaves them when unloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter

from pycrdt.websocket import WebsocketServer, YRoom

from .limits import (
    DEFAULT_COMPACT_EVERY,
    DEFAULT_MAX_ROOMS,
    DEFAULT_MAX_ROOMS_PER_ADDRESS,
    DEFAULT_ROOM_IDLE,
)
from .replicas import Replicas, RoomLink
from .room import MarketRoom, background
from .store import Store

log = logging.getLogger("igora.market")


class MarketServer(WebsocketServer):
    """The market's rooms, by name."""

    rooms: dict[str, MarketRoom]  # type: ignore[assignment]  # only ours are made

    def __init__(
        self,
        store: Store,
        compact_every: int = DEFAULT_COMPACT_EVERY,
        *,
        room_idle: float = DEFAULT_ROOM_IDLE,
        max_rooms: int = DEFAULT_MAX_ROOMS,
        max_rooms_per_address: int = DEFAULT_MAX_ROOMS_PER_ADDRESS,
        replicas: Replicas | None = None,
    ) -> None:
        super().__init__(auto_clean_rooms=False, log=logging.getLogger("igora.market.server"))
        self.store = store
        self.compact_every = compact_every
        self.room_idle = room_idle
        self.max_rooms = max_rooms
        self.max_rooms_per_address = max_rooms_per_address
        self.replicas = replicas
        self.opener: dict[str, str] = {}  # room in memory -> the address that loaded it
        self.opened: Counter[str] = Counter()  # address -> rooms in memory it loaded
        self._start_guards: dict[int, asyncio.Lock] = {}

    def room(self, name: str, address: str | None = None) -> MarketRoom:
        """The room of that name, loaded from the store (not started) if not in memory,
        counted then as loaded by ``address``."""
        if name not in self.rooms:
            self.rooms[name] = MarketRoom(
                name, self.store, self.compact_every, writing=self.replicas is None
            )
            if address is not None:
                self.opener[name] = address
                self.opened[address] += 1
        return self.rooms[name]

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
                    if self.replicas is not None and isinstance(room, MarketRoom):
                        await self.replicas.join(RoomLink(self.replicas, room))
        finally:
            if room.started.is_set():
                self._start_guards.pop(id(room), None)

    async def get_room(self, name: str) -> MarketRoom:
        room = self.room(name)
        await self.start_room(room)
        return room

    def flush_sync(self) -> None:
        """Write what every room has not written yet, blocking (at shutdown)."""
        for room in list(self.rooms.values()):
            room.history.flush_sync()

    async def refusal(self, name: str, address: str) -> str | None:
        """Why ``address`` may not load room ``name`` into memory now (None: it may, or
        the room is there already). With ``max_rooms`` in memory, the room idle the
        longest is unloaded first to make space; refused only if none is idle."""
        for _ in range(10):
            if name in self.rooms:
                return None
            if len(self.rooms) < self.max_rooms:
                break
            idle = [r for r in self.rooms.values() if r.holders == 0]
            if not idle:
                return f"{self.max_rooms} rooms in memory already, none idle"
            await self._unload(  # one line each: debug
                min(idle, key=lambda r: r.idle_since),
                f"to make space ({self.max_rooms} rooms in memory)",
                logging.DEBUG,
            )
        else:
            return f"{self.max_rooms} rooms in memory already"
        if self.opened[address] >= self.max_rooms_per_address:
            return f"{self.max_rooms_per_address} rooms opened from {address} are in memory already"
        return None

    def unload_later(self, room: MarketRoom) -> None:
        """Drop a room nobody uses from memory after ``room_idle`` s; it stays in the store
        (in memory without --data, where its history takes less than its live document)."""
        room.idle_since = time.monotonic()
        asyncio.get_running_loop().call_later(
            self.room_idle, lambda: background(self._unload_if_idle(room))
        )

    async def _unload_if_idle(self, room: MarketRoom) -> None:
        if room.holders or self.rooms.get(room.name) is not room:
            return
        if time.monotonic() - room.idle_since < self.room_idle * 0.99:
            return  # someone came and went since: a later call decides
        await self._unload(room, f"after {self.room_idle:g} s without connections")

    async def _unload(self, room: MarketRoom, why: str, level: int = logging.INFO) -> None:
        """Drop an idle room from memory (its history is in the store)."""
        await room.history.flush()
        if room.holders or room.history.pending or self.rooms.get(room.name) is not room:
            return
        del self.rooms[room.name]  # no await between the check and this
        if self.replicas is not None:
            await self.replicas.leave(room.name)
        address = self.opener.pop(room.name, None)
        if address is not None:
            self.opened[address] -= 1
            if self.opened[address] <= 0:
                del self.opened[address]
        with contextlib.suppress(Exception):
            await room.stop()
        log.log(level, "room %s: unloaded from memory %s", room.name, why)
