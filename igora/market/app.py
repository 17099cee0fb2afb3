"""The market's HTTP and websocket routes (a Starlette application).

``GET /`` answers ``Okay`` (as the original public market did), ``GET /status`` lists
the rooms in memory (``summary``), ``GET /rooms/ROOM/tasks/ID`` gives an archived task,
``GET /rooms/ROOM/view`` what the web view and ``igora status`` show of a v3 room (its
workers, broker, agents and ``board``), and any other path is a room:
``ws://HOST:PORT/ROOM``.

A room speaks one protocol, set by the market (docs/protocol-v3.md §10): version 2 (the
y-websocket rooms of ``MarketServer``) unless the market is ``secure`` or the room is one
of ``v3_rooms``; then version 3 (``igora.market.v3``), for connections that ask for the
``igora.3`` subprotocol. Any other connection to a v3 room gets a y-protocols
permission-denied message saying why, then the close code 4426. A v3 agent in a v2 room
is accepted without the subprotocol and served version 2: that is how it learns the
room's protocol.
"""

from __future__ import annotations

import asyncio
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
from ..identity import Identity
from ..v3 import wire
from .channel import MarketChannel
from .limits import Connections, MarketSettings
from .members import REFRESH, Membership
from .replicas import Replicas
from .room import MarketRoom
from .server import MarketServer
from .store import Store
from .v3.bank import Bank, Credits, ledger_path
from .v3.connection import V3Connection
from .v3.ledger_link import ReplicaBank
from .v3.room import DocLimits, V3Rooms

log = logging.getLogger("igora.market")

NEEDS_V3 = (
    "this room speaks Igora protocol 3 (identities, owned documents); original "
    "y-websocket agents can join a room of an open market; see docs/security.md"
)
"""What a client without the ``igora.3`` subprotocol is told in a v3 room (§10)."""


class Market:
    """The market application: Starlette routes around a MarketServer."""

    def __init__(
        self,
        data: Path | None,
        settings: MarketSettings | None = None,
        identity: Identity | None = None,
    ) -> None:
        settings = settings or MarketSettings()
        if settings.speaks_v3 and identity is None:
            raise ValueError("a market with v3 rooms needs its identity")
        self.settings = settings
        # Without a folder the rooms' histories are kept in an SQLite database in memory:
        # a room rebuilds its document from it (after a panic, or when it is loaded again).
        self.store = Store(data / "market.sqlite3" if data is not None else ":memory:")
        redis = settings.redis
        self.replicas = Replicas(redis) if redis is not None else None
        self.server = MarketServer(
            self.store,
            settings.compact_every,
            room_idle=settings.room_idle,
            max_rooms=settings.max_rooms,
            max_rooms_per_address=settings.max_rooms_per_address,
            replicas=self.replicas,
        )
        self.connections = Connections(settings.max_connections, settings.max_per_address)
        self.identity = identity
        # Who may hold a room's broker lease: in a secure market the market's own key and
        # --broker-key; in the v3 rooms of an open market, any identity (security.md §5).
        self.brokers: frozenset[str] | None = None
        if settings.secure and identity is not None:
            self.brokers = settings.broker_keys | {identity.id}
        limits = DocLimits(
            task_document=settings.max_message,
            retention=settings.task_retention,
            identity_bytes=settings.max_identity_bytes,
        )
        self.v3_limits = {
            "maxMessage": settings.max_message,
            "taskDocuments": limits.task_documents,
            "taskDocumentBytes": limits.task_document,
            "identityBytes": limits.identity_bytes,
        }
        market_id = identity.id if identity is not None else ""
        # Who a v3 room admits (security.md §5); None: the market has no v3 room.
        self.membership: Membership | None = None
        if identity is not None:
            self.membership = Membership(self.store, settings.members, identity.id)
        self.v3_connections: set[V3Connection] = set()  # welcomed, for the ban checks
        self._denials: set[asyncio.Task[None]] = set()  # closing banned connections
        # Credits (credits.md): the ledger beside the store, for the market's v3 rooms;
        # on replicas, kept by the one holding its lease (credits.md §7).
        self.bank: Credits | None = None
        self.replica_bank: ReplicaBank | None = None
        if identity is not None:
            kept = {
                "grant": settings.grant,
                "receipt_wait": settings.receipt_wait,
                "pinned": dict(settings.model_params),
            }
            if self.replicas is None:
                self.bank = Bank(ledger_path(data), identity.id, **kept)  # type: ignore[arg-type]
            else:
                self.replica_bank = ReplicaBank(
                    self.replicas,
                    ledger_path(data),
                    identity.id,
                    **kept,  # type: ignore[arg-type]
                )
                self.bank = self.replica_bank
        self.v3 = V3Rooms(
            self.store,
            limits,
            settings.room_idle,
            settings.max_rooms,
            market_id,
            self.v3_limits,
            self.replicas,
            self.bank,
        )
        if self.bank is not None:
            self.bank.on_change = self.v3.standing_changed
        self.app = Starlette(
            routes=[
                Route("/", self.index),
                Route("/status", self.status),
                Route("/rooms/{room}/tasks/{task_id}", self.archived_task),
                Route("/rooms/{room:path}/view", self.room_view),
                WebSocketRoute("/{room:path}", self.websocket),
            ],
            lifespan=self.lifespan,
        )

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        checks = None
        if self.membership is not None:
            checks = asyncio.create_task(self._check_members(self.membership))
        if self.replicas is not None:
            await self.replicas.start()
        if self.replica_bank is not None:
            await self.replica_bank.start()
        async with self.server:
            yield
            if checks is not None:
                checks.cancel()
            self.server.flush_sync()
            self.v3.flush_sync()
            if self.bank is not None:
                await self.bank.close()
        if self.replicas is not None:
            await self.replicas.stop()
        self.store.close()
        if self.store.durable:
            log.info("market stopped, store %s flushed and closed", self.store.path)
        else:
            log.info("market stopped")

    async def _check_members(self, membership: Membership) -> None:
        """Read bans and members again every ``REFRESH`` s; close the connections of
        the ids no longer admitted."""
        while True:
            await asyncio.sleep(REFRESH)
            try:
                await asyncio.to_thread(membership.refresh)
            except Exception as exc:  # a locked or damaged store: keep the last view
                log.warning("cannot read the members and bans: %s", exc)
                continue
            for connection in list(self.v3_connections):
                reason = membership.expelled(connection.ids)
                if reason is not None and not connection.closed:
                    # A task each: a peer that reads nothing must not delay the others.
                    task = asyncio.create_task(connection.deny(reason))
                    self._denials.add(task)
                    task.add_done_callback(self._denials.discard)

    async def index(self, request: Request) -> Response:
        return PlainTextResponse("Okay")

    def speaks_v3(self, room: str) -> bool:
        return self.settings.secure or room in self.settings.v3_rooms

    @property
    def members_only(self) -> bool:
        """Whether this market's v3 rooms admit members only: then their view (who is
        there, the adverts, the board) is asked over a proved connection, not served
        over HTTP (security.md §5)."""
        return self.membership is not None and self.membership.members_only

    async def status(self, request: Request) -> Response:
        rooms = [{**r.summary(), "protocol": 2} for r in self.server.rooms.values()]
        agents = not self.members_only
        return JSONResponse(
            {
                "status": "ok",
                "version": __version__,
                "market": {
                    "id": self.identity.id if self.identity is not None else None,
                    "secure": self.settings.secure,
                    "v3Rooms": sorted(self.settings.v3_rooms),
                    "members": self.membership.mode if self.membership else None,
                },
                "replica": self.replicas.id if self.replicas is not None else None,
                "connections": self.connections.total,
                "rooms": rooms + [r.summary(agents) for r in self.v3.rooms.values()],
            }
        )

    async def archived_task(self, request: Request) -> Response:
        room, task_id = request.path_params["room"], request.path_params["task_id"]
        task = self.store.archived(room, task_id)
        if task is None:
            why = f"no archived task {task_id!r} in room {room!r}: it is not finished, or never was"
            return _error(404, why, "no_task")
        return JSONResponse(task)

    async def room_view(self, request: Request) -> Response:
        """A v3 room in memory as ``V3Room.view`` shows it; 404 with the reason else."""
        name = request.path_params["room"].strip("/") or "market"
        if self.speaks_v3(name) and self.members_only:
            why = (
                f"room {name!r} shows itself to its members only: `igora status` asks "
                "over a connection that proves a member's identity"
            )
            return _error(403, why, "members_only")
        room = self.v3.rooms.get(name) if self.speaks_v3(name) else None
        if room is not None:
            return Response(room.view_text(), media_type="application/json")
        if not self.speaks_v3(name):
            why = f"room {name!r} speaks protocol 2: its agents are listed in /status"
        else:
            why = f"room {name!r} is not in memory: no agent has joined it lately"
        return _error(404, why, "no_room")

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
        if self.speaks_v3(room_name):
            try:
                await self._serve_v3(websocket, room_name, address, peer)
            except WebSocketDisconnect:
                pass
            except Exception:
                log.exception("%s: connection failed", peer)
            finally:
                self.connections.closed(address)
            return
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
            await channel.send_awareness_snapshot(room)
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

    async def _serve_v3(
        self, websocket: WebSocket, room_name: str, address: str, peer: str
    ) -> None:
        """A connection to a v3 room: refused (4426) unless it asked for ``igora.3``;
        then the handshake, then its frames (``v3.connection``)."""
        if wire.SUBPROTOCOL not in websocket.scope.get("subprotocols", []):
            await websocket.accept()
            self.connections.refused(address, peer, f"room {room_name} speaks protocol 3")
            await websocket.send_bytes(wire.denied(NEEDS_V3))
            await websocket.close(
                code=wire.Close.NEEDS_V3, reason="this room speaks Igora protocol 3"
            )
            return
        assert self.identity is not None
        await websocket.accept(subprotocol=wire.SUBPROTOCOL)
        connection = V3Connection(
            websocket,
            room_name,
            peer,
            self.identity,
            self.v3_limits,
            self.brokers,
            self.connections.log_refusal,
            self.membership,
        )
        if not await connection.handshake():
            return
        if self.bank is not None:
            self.bank.welcome(connection.ids)  # a first handshake's grant
        self.v3_connections.add(connection)
        try:
            await self._join_v3(connection, websocket, room_name)
        finally:
            self.v3_connections.discard(connection)

    async def _join_v3(
        self, connection: V3Connection, websocket: WebSocket, room_name: str
    ) -> None:
        room = await self.v3.room(room_name)
        if isinstance(room, str):
            await connection.close(1013, room)  # try again later, as a v2 room says
            return
        room.holders += 1
        room.join(connection)
        log.debug("room %s: %s joined", room_name, connection.who)
        try:
            await connection.serve(room)
        finally:
            holder = room.leave(connection)
            log.debug("room %s: %s left", room_name, connection.who)
            if isinstance(holder, V3Connection):  # the next broker in line
                holder.lease_granted(room.lease.epoch)
            room.holders -= 1
            if room.holders == 0:
                self.v3.unload_later(room)
            connection.outbox.close()
            if not connection.closed:
                with contextlib.suppress(Exception):
                    await websocket.close()


def _error(status: int, message: str, code: str) -> JSONResponse:
    """An error in the OpenAI-style body every Igora HTTP route answers with."""
    body = {"error": {"message": message, "type": "invalid_request_error", "code": code}}
    return JSONResponse(body, status_code=status)
