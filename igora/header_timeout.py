"""A deadline on HTTP request headers, for the uvicorn servers (market and gateway).

Why: uvicorn waits for a request's headers as long as the socket stays open, and counts
such a connection nowhere. A client sending half a request and nothing more (slowloris)
kept 1,500 sockets open on the market for as long as it liked (issue 20, finding 4).

The HTTP protocol class returned by ``http_protocol`` closes a connection whose request
headers are not complete ``timeout`` seconds after it connected, or after the first bytes
of a further request on a keep-alive connection (an idle one is closed by uvicorn's own
keep-alive timeout, 5 s). It also admits at most ``max_per_address`` such connections
from one IP address at once: past it, a new one is answered 403 and closed at once. A
connection stops counting when its headers are complete (the market's websocket limits
take over after the upgrade). Closings are logged at most one line per second.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

from .ratelog import RateLimitedLog

DEFAULT_HEADER_TIMEOUT = 10.0
"""Seconds a client has to send a request's headers (nginx allows 60, Apache 20-40;
a websocket handshake from an agent takes milliseconds)."""


_REFUSED = (
    b"HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\ncontent-length: 42\r\n"
    b"connection: close\r\n\r\ntoo many connections from your IP address\n"
)


def peer_of(protocol: object) -> str:
    """``address:port`` of the client of a uvicorn protocol, for log lines."""
    client = getattr(protocol, "client", None)
    return f"{client[0]}:{client[1]}" if client else "?"


def http_protocol(
    base: type[asyncio.Protocol] | None,
    timeout: float,
    log: logging.Logger,
    max_per_address: int | None = None,
) -> type[asyncio.Protocol]:
    """``base`` (uvicorn's auto HTTP protocol if None) with the header deadline."""
    if base is None:
        from uvicorn.protocols.http.auto import AutoHTTPProtocol

        base = AutoHTTPProtocol
    waiting: Counter[str] = Counter()  # address -> connections still sending headers
    warn_refused, warn_late = RateLimitedLog(log), RateLimitedLog(log)

    class HeaderTimeout(base):  # type: ignore[misc, valid-type]
        _timer: asyncio.TimerHandle | None = None
        _counted: str | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            address = self.client[0] if getattr(self, "client", None) else "?"
            if max_per_address is not None and waiting[address] >= max_per_address:
                warn_refused(
                    "%s: refused, %d connections from it are still sending their headers",
                    address,
                    max_per_address,
                )
                transport.write(_REFUSED)  # what a refused websocket handshake gets too
                transport.close()
                return
            self._wait(True)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._wait(self._between_requests())

        def connection_lost(self, exc: Exception | None) -> None:
            self._wait(False)
            super().connection_lost(exc)

        def _between_requests(self) -> bool:
            """Whether the connection is ours and reads a request's headers."""
            transport = self.transport
            if transport.is_closing() or transport.get_protocol() is not self:
                return False  # closed, or upgraded to a websocket
            cycle = self.cycle
            return cycle is None or cycle.response_complete

        def _wait(self, on: bool) -> None:
            if on and self._timer is None:
                self._timer = self.loop.call_later(timeout, self._expired)
                self._counted = self.client[0] if self.client else "?"
                waiting[self._counted] += 1
            elif not on and self._timer is not None:
                self._timer.cancel()
                self._timer = None
                if self._counted is not None:
                    waiting[self._counted] -= 1
                    if waiting[self._counted] <= 0:
                        del waiting[self._counted]
                    self._counted = None

        def _expired(self) -> None:
            self._wait(False)  # (cancelling the handle that fired does nothing)
            if self._between_requests():
                warn_late(
                    "%s: disconnected, request headers not complete after %g s",
                    peer_of(self),
                    timeout,
                )
                self.transport.close()

    HeaderTimeout.__name__ = f"HeaderTimeout{base.__name__}"
    return HeaderTimeout
