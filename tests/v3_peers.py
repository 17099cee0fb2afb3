"""A raw protocol-3 peer for the tests: a ``websockets`` connection speaking
``igora.v3.wire`` frame by frame, with no rule of its own.

It does what an honest agent does (``handshake``, ``send`` of documents and
subscriptions) and what an attacker tries (no handshake, a recorded ``RESPONSE``, frames
to documents it does not own, raw bytes): the market's answer is what the tests read.
tests/test_attacks.py reuses it as its rogue agent.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from nacl.signing import SigningKey
from pycrdt import Doc, Map
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from igora.identity import Identity
from igora.v3 import wire
from igora.v3.handshake import Challenge, Response, Welcome

BARRIER_TASK = "barrier-00000000"
"""The task id of the (never written) document ``RawPeer.barrier`` asks about."""


def new_identity() -> Identity:
    """A fresh identity held in memory (the tests need many, and no key file)."""
    return Identity(SigningKey.generate())


def update_setting(doc: Doc[Any], map_name: str, key: str, value: Any) -> bytes:
    """Set ``doc[map_name][key] = value``; the Yjs update that did it."""
    before = doc.get_state()
    doc.get(map_name, type=Map)[key] = value
    return doc.get_update(before)


class RawPeer:
    """One websocket to a room, frames in and out."""

    def __init__(self, ws: ClientConnection, room: str) -> None:
        self.ws = ws
        self.room = room
        self.challenge: Challenge | None = None
        self.response: Response | None = None
        self.welcome: Welcome | None = None
        self.received: list[wire.Frame] = []  # read by ``until``, in order

    @classmethod
    async def open(cls, url: str, room: str, subprotocol: bool = True) -> RawPeer:
        """Connect (asking for ``igora.3`` unless told not to); nothing sent yet."""
        ws = await connect(
            f"{url}/{room}",
            subprotocols=[wire.SUBPROTOCOL] if subprotocol else None,  # type: ignore[list-item]
            open_timeout=10,
            max_size=None,
        )
        return cls(ws, room)

    @classmethod
    async def join(cls, url: str, room: str, *identities: Identity) -> RawPeer:
        """Connect and prove ``identities``: a welcomed peer."""
        peer = await cls.open(url, room)
        await peer.handshake(*identities)
        return peer

    @property
    def subprotocol(self) -> str | None:
        return self.ws.subprotocol

    async def read_challenge(self, timeout: float = 10) -> Challenge:
        frame = wire.decode(await self.recv_bytes(timeout))
        assert isinstance(frame, wire.Auth), frame
        self.challenge = Challenge.read(frame)
        return self.challenge

    async def handshake(self, *identities: Identity, timeout: float = 10) -> Welcome:
        """Answer the market's challenge with ``identities``; the WELCOME, its market
        signature checked against the key the challenge named."""
        challenge = await self.read_challenge(timeout)
        self.response = Response.make(challenge, list(identities))
        await self.send(self.response.frame())
        frame = wire.decode(await self.recv_bytes(timeout))
        assert isinstance(frame, wire.Auth), frame
        t = self.response.check(challenge)
        self.welcome = Welcome.read(frame, challenge, t)
        return self.welcome

    async def send(self, *frames: wire.Frame) -> None:
        """Send frames: one alone, several as one BATCH."""
        await self.ws.send(wire.batch([wire.encode(f) for f in frames]))

    async def send_raw(self, data: bytes | str) -> None:
        await self.ws.send(data)

    async def recv_bytes(self, timeout: float = 10) -> bytes:
        data = await asyncio.wait_for(self.ws.recv(), timeout)
        assert isinstance(data, bytes), f"a text frame: {data!r}"
        return data

    async def until(
        self, match: Callable[[wire.Frame], bool], timeout: float = 10, what: str = "a frame"
    ) -> wire.Frame:
        """The first frame received (from now, or kept from before) that ``match``es."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        seen = 0
        while True:
            for frame in self.received[seen:]:
                if match(frame):
                    self.received.remove(frame)
                    return frame
            seen = len(self.received)
            left = end - loop.time()
            if left <= 0:
                raise AssertionError(f"no {what} within {timeout:g} s; got {self.received}")
            try:
                data = await self.recv_bytes(left)
            except TimeoutError:
                continue
            self.received += wire.frames(data)

    async def doc(self, name: str, sync: wire.Sync | None = None, timeout: float = 10) -> wire.Doc:
        """The next DOC frame of ``name`` (of that sync type if given)."""
        frame = await self.until(
            lambda f: (
                isinstance(f, wire.Doc) and f.name == name and (sync is None or f.sync == sync)
            ),
            timeout,
            f"DOC {name} {sync.name if sync else ''}",
        )
        assert isinstance(frame, wire.Doc)
        return frame

    async def barrier(self, timeout: float = 10) -> None:
        """Wait until the market has handled every frame sent before: a step 1 of a
        document of its own (one that does not exist) is answered in order, by a step 2
        and the market's step 1, and changes nothing."""
        assert self.response is not None, "a barrier needs a welcomed peer"
        name = f"p/{self.response.ids[0]}/{BARRIER_TASK}"
        await self.send(wire.Doc(name, wire.Sync.STEP1, b"\x00"))
        await self.doc(name, wire.Sync.STEP2, timeout)
        await self.doc(name, wire.Sync.STEP1, timeout)

    async def notice(self, doc: str, timeout: float = 10) -> wire.Notice:
        frame = await self.until(
            lambda f: isinstance(f, wire.Notice) and f.doc == doc, timeout, f"NOTICE for {doc}"
        )
        assert isinstance(frame, wire.Notice)
        return frame

    async def closed(self, timeout: float = 10) -> tuple[int | None, str]:
        """Read until the market closes the socket; its close code and reason."""
        with contextlib.suppress(ConnectionClosed):
            async with asyncio.timeout(timeout):
                while True:
                    await self.ws.recv()
        rcvd = self.ws.close_code, self.ws.close_reason or ""
        return rcvd[0], rcvd[1]

    async def close(self) -> None:
        await self.ws.close()
