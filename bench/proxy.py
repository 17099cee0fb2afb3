"""A TCP proxy that counts the bytes going each way (websocket frames included)."""

from __future__ import annotations

import asyncio
import contextlib

from .common import free_port


class CountingProxy:
    """Listens on a free loopback port and forwards every connection to ``target_port``.

    ``up`` counts bytes from the connecting agent to the market, ``down`` the other way.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.up = 0
        self.down = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def __aenter__(self) -> CountingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: bool
    ) -> None:
        try:
            while data := await reader.read(65536):
                if up:
                    self.up += len(data)
                else:
                    self.down += len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        r2, w2 = await asyncio.open_connection("127.0.0.1", self.target_port)
        for t in (
            asyncio.create_task(self._pipe(reader, w2, True)),
            asyncio.create_task(self._pipe(r2, writer, False)),
        ):
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)
