"""The market's HTTP and websocket routes (a Starlette application).

``GET /`` answers ``Okay`` (as the original public market did), ``GET /status`` lists
the rooms in memory (``summary``), ``GET /rooms/ROOM/tasks/ID`` gives an archived task,
and any other path is a room: ``ws://HOST:PORT/ROOM``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from .. import __version__
from .channel import MarketChannel
from .limits import (
    DEFAULT_COMPACT_EVERY,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_PER_ADDRESS,
    DEFAULT_MAX_ROOMS,
    DEFAULT_MAX_ROOMS_PER_ADDRESS,
    DEFAULT_ROOM_IDLE,
    Connections,
)
from .replicas import Replicas
from .room import MarketRoom
from .server import MarketServer
from .store import Store

log = logging.getLogger("igora.market")


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
        redis: str | None = None,
    ) -> None:
        # Without a folder the rooms' histories are kept in an SQLite database in memory:
        # a room rebuilds its document from it (after a panic, or when it is loaded again).
        self.store = Store(data / "market.sqlite3" if data is not None else ":memory:")
        self.replicas = Replicas(redis) if redis is not None else None
        self.server = MarketServer(
            self.store,
            compact_every,
            room_idle=room_idle,
            max_rooms=max_rooms,
            max_rooms_per_address=max_rooms_per_address,
            replicas=self.replicas,
        )
        self.connections = Connections(max_connections, max_per_address)
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
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        if self.replicas is not None:
            await self.replicas.start()
        async with self.server:
            yield
            self.server.flush_sync()
        if self.replicas is not None:
            await self.replicas.stop()
        self.store.close()
        if self.store.durable:
            log.info("market stopped, store %s flushed and closed", self.store.path)
        else:
            log.info("market stopped")

    async def index(self, request: Request) -> Response:
        return PlainTextResponse("Okay")

    async def status(self, request: Request) -> Response:
        return JSONResponse(
            {
                "status": "ok",
                "version": __version__,
                "replica": self.replicas.id if self.replicas is not None else None,
                "connections": self.connections.total,
                "rooms": [r.summary() for r in self.server.rooms.values()],
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
        refusal = self.connections.refusal(room_name, address)
        if refusal is not None:
            self.connections.refused(address, peer, refusal)
            await websocket.close(code=1013)
            return
        self.connections.opened(address)
        channel = MarketChannel(websocket, room_name, peer)
        room: MarketRoom | None = None
        try:
            await websocket.accept()
            refusal = await self.server.refusal(room_name, address)
            if refusal is not None:
                self.connections.refused(address, peer, refusal)
                channel.closed = True
                await websocket.close(code=1013, reason=refusal[:120])
                return
            room = self.server.room(room_name, address)  # no await since the check
            room.holders += 1  # before any await: an idle room is not unloaded under us
            await self.server.start_room(room)
            channel.room = room
            await channel.send_awareness_snapshot(room.awareness)
            await room.serve(channel)  # a pycrdt Channel: path, send, recv, async iteration
        except WebSocketDisconnect:
            pass
        except Exception:
            log.exception("%s: connection failed", peer)
        finally:
            self.connections.closed(address)
            if room is not None:
                room.holders -= 1
                room.forget(channel, peer)
                if room.holders == 0:
                    self.server.unload_later(room)
            if not channel.closed:
                with contextlib.suppress(Exception):
                    await websocket.close()
