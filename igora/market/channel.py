"""One connection to a room: a Starlette websocket seen as a pycrdt ``Channel``.

The channel reads frames, checks each (``frames.check_frame``), and hands the room what
it may see: document updates go to ``receive`` (which applies them, or tells why not),
awareness updates to ``claim`` and ``relay_awareness``; only sync step 1 frames are
returned to pycrdt-websocket's ``YRoom.serve``, which answers them. What the room sends
goes through the channel's ``Outbox`` (``fanout``).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Protocol

from pycrdt import Awareness, YMessageType
from starlette.websockets import WebSocket

from ..updates import Parsed
from .fanout import Outbox
from .frames import (
    AUTH,
    QUERY_AWARENESS,
    AwarenessEntry,
    BadFrame,
    EncodedStates,
    check_frame,
    removal_message,
)

log = logging.getLogger("igora.market")


class Room(Protocol):
    """What a channel needs of its room (``room.MarketRoom``)."""

    sender: MarketChannel | None
    awareness: Awareness
    encoded_states: EncodedStates

    def claim(self, channel: MarketChannel, entries: list[AwarenessEntry]) -> None: ...

    def relay_awareness(
        self, channel: MarketChannel, message: bytes, entries: list[AwarenessEntry]
    ) -> None: ...

    def receive(
        self, channel: MarketChannel | None, update: bytes, parsed: Parsed
    ) -> str | None: ...


class MarketChannel:
    """A Starlette websocket seen as a pycrdt Channel, checking every frame."""

    def __init__(self, websocket: WebSocket, room: str, peer: str) -> None:
        self.websocket = websocket
        self._path = room
        self.peer = peer
        self.controlled: set[int] = set()  # awareness client ids this socket speaks for
        self.owner: int | None = None  # awareness client id of the agent on this socket
        self.closed = False
        self.room: Room | None = None
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
                if message.get("code") == 1009:
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
            kind = data[0]
            if kind == YMessageType.AWARENESS:
                if self.room is not None:
                    self._awareness(self.room, data, frame.awareness)
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
            return bytes(data)

    def _awareness(self, room: Room, data: bytes, entries: list[AwarenessEntry]) -> None:
        # An agent's own state is the one it brings into the room: y-websocket clients
        # also re-broadcast the states of others, which are present already.
        first = (
            self.owner is None
            and len(entries) == 1
            and entries[0][2] is not None
            and entries[0][0] not in room.awareness.states
        )
        if first:
            self.owner = entries[0][0]
        room.claim(self, entries)
        room.relay_awareness(self, data, entries)
        if first:
            self.nudge(entries[0][0], entries[0][1])

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
        self.outbox.put(removal_message([(client_id, clock)]))

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

    async def send_awareness_snapshot(self, room: Room) -> None:
        """Send the states of the others in the room (not the room's own, nor this
        connection's)."""
        awareness = room.awareness
        ids = [
            c
            for c, s in awareness.states.items()
            if s and c != awareness.client_id and c not in self.controlled
        ]
        if ids:
            await self.send(room.encoded_states.message(awareness, ids))

    async def reject(self, reason: str) -> None:
        log.warning("%s: disconnected, %s", self.peer, reason)
        self.closed = True
        self.outbox.close()
        with contextlib.suppress(Exception):
            await self.websocket.close(code=1003)
