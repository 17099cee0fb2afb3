"""A swarm process: N light y-websocket agents in one room, with churn.

``python -m bench.swarm URL N HEARTBEAT CHURN SECONDS READY_FILE [--v3 ROOM]``. Each
agent speaks the protocol as any agent does on the wire (sync step 1 and 2, an awareness
state in Igora's layout refreshed every HEARTBEAT s, a goodbye when it leaves) but keeps no
document: it reads and drops what the market sends, so that four such processes can
hold 1,000 connections on two cores and the market is what gets measured. Once all
are connected it writes READY_FILE, then every second CHURN of them leave and as many
new ones join, for SECONDS seconds.

With ``--v3 ROOM`` the agents are protocol 3 ``Session``s in ROOM, each with its own
identity (made in memory): the handshake, a ``PRESENCE`` every HEARTBEAT s, no
subscription (a client that asks nothing reads nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import time
from pathlib import Path

from nacl.signing import SigningKey
from pycrdt import (
    Doc,
    YMessageType,
    create_sync_message,
    handle_sync_message,
)
from websockets.asyncio.client import connect

from igora.config import MarketAddress
from igora.identity import Identity
from igora.market.frames import awareness_message
from igora.protocol import PROTOCOL_VERSION, new_id, now_ms
from igora.v3.session import Session

EMPTY = Doc()


def awareness(client_id: int, clock: int, state: dict | None) -> bytes:
    return awareness_message([(client_id, clock, state)])


class Light:
    def __init__(self, url: str, n: int, heartbeat: float) -> None:
        self.url = url
        self.client_id = random.getrandbits(31)
        self.clock = 0
        self.heartbeat = heartbeat
        self.state = {
            "id": new_id(),
            "name": f"swarm-{n}",
            "type": "client",
            "style": "text",
            "state": "ready",
            "protocol": PROTOCOL_VERSION,
            "heartbeat": heartbeat,
            "since": now_ms(),
            "date": now_ms(),
        }
        self.synced = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.ws = None

    async def run(self) -> None:
        async with connect(self.url, max_size=None, open_timeout=300, ping_interval=None) as ws:
            self.ws = ws
            await ws.send(create_sync_message(EMPTY))
            await self.beat()
            beats = asyncio.create_task(self.beats())
            try:
                async for message in ws:
                    if isinstance(message, bytes) and message[:2] == bytes([YMessageType.SYNC, 0]):
                        reply = handle_sync_message(message[1:], EMPTY)
                        if reply:
                            await ws.send(reply)
                    elif isinstance(message, bytes) and message[:2] == bytes(
                        [YMessageType.SYNC, 1]
                    ):
                        self.synced.set()
            finally:
                beats.cancel()

    async def beat(self) -> None:
        self.clock += 1
        self.state["date"] = now_ms()
        assert self.ws is not None
        await self.ws.send(awareness(self.client_id, self.clock, self.state))

    async def beats(self) -> None:
        await asyncio.sleep(random.random() * self.heartbeat)
        while True:
            await self.beat()
            await asyncio.sleep(self.heartbeat)

    async def start(self) -> None:
        self.task = asyncio.create_task(self.run())
        await asyncio.wait_for(self.synced.wait(), 300)

    async def stop(self) -> None:
        if self.ws is not None:
            self.clock += 1
            with contextlib.suppress(Exception):
                await self.ws.send(awareness(self.client_id, self.clock, None))
                await self.ws.close()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task


class Light3:
    """A protocol 3 agent present in a room and reading nothing."""

    def __init__(self, url: str, room: str, n: int, heartbeat: float) -> None:
        name = f"swarm-{n}"
        self.session = Session(
            MarketAddress(url, room),
            Identity(SigningKey.generate()),
            name=name,
            state={"type": "client", "name": name},
            heartbeat=heartbeat,
            connect_timeout=300,
        )

    async def start(self) -> None:
        await self.session.start()

    async def stop(self) -> None:
        await self.session.stop()


async def main(
    url: str,
    n: int,
    heartbeat: float,
    churn: float,
    seconds: float,
    ready: str,
    v3_room: str | None = None,
) -> None:
    count = 0

    def make() -> Light | Light3:
        nonlocal count
        count += 1
        if v3_room is not None:
            return Light3(url, v3_room, count, heartbeat)
        return Light(f"{url}/market", count, heartbeat)

    agents = [make() for _ in range(n)]
    for i in range(0, n, 25):  # a crowd arriving in waves
        await asyncio.gather(*(a.start() for a in agents[i : i + 25]))
    Path(ready).write_text("ready")
    end = time.monotonic() + seconds
    carry = 0.0
    while time.monotonic() < end:
        await asyncio.sleep(1.0)
        carry += churn
        while carry >= 1:
            carry -= 1
            old = agents.pop(random.randrange(len(agents)))
            await old.stop()
            new = make()
            await new.start()
            agents.append(new)
    await asyncio.gather(*(a.stop() for a in agents))


if __name__ == "__main__":
    url, n, hb, churn, seconds, ready = sys.argv[1:7]
    room = sys.argv[8] if sys.argv[7:8] == ["--v3"] else None
    asyncio.run(main(url, int(n), float(hb), float(churn), float(seconds), ready, room))
