"""``igora market``: serve the market (``app.Market``) with uvicorn until interrupted.

Any y-websocket client joins a room at ``ws://HOST:PORT/<room>``; rooms are created on
first join and their documents persist in ``DATA/market.sqlite3``.

What the market adds to plain pycrdt-websocket:
- every incoming frame is checked before the room sees it (``frames``); an offender is
  disconnected with a log line and nothing of its frame is kept; an update pycrdt panics
  on all the same makes the room rebuild its document from its history (``room``);
- the awareness states a connection announced are removed, and the removal broadcast,
  when its socket closes, so the others notice a dead agent at once (``room``);
- a newcomer receives the current awareness states on connect (``channel``);
- limits on message size, on connections (in all and per address), on rooms in memory
  (in all and per address: ``server``), and a deadline on HTTP request headers
  (``igora.header_timeout``); see ``limits``;
- finished tasks (entries of ``done``) are copied to the archive as they appear
  (``persistence``), and rooms are compacted (``compactor``);
- rooms of protocol 3 (``--secure``: all; ``--v3-room NAME``: those), served by
  ``igora.market.v3`` under the market's identity (``igora.identity``).
- with ``--redis``, rooms shared with every other market on that Redis (``replicas``).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
from pathlib import Path
from typing import Any

from ..header_timeout import http_protocol, peer_of
from ..identity import Identity, key_path, load_identity
from .app import Market
from .limits import MarketSettings
from .replicas import check_redis

log = logging.getLogger("igora.market")


def _listen(host: str, port: int) -> socket.socket:
    """Bind the listening socket ourselves, so that a busy port is a one-line error."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise OSError(f"cannot listen on {host!r}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise OSError(
                f"port {port} on {host} is in use (another market is running? "
                "choose another with --port)"
            ) from None
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


def _loopback(host: str) -> bool:
    """Whether ``host`` is this machine only (a name is looked up)."""
    try:
        infos = socket.getaddrinfo(host, None)
        return all(ipaddress.ip_address(str(info[4][0])).is_loopback for info in infos)
    except (socket.gaierror, ValueError):  # unknown, or an address with a scope
        return False


class _QuietInvalidRequest(logging.Filter):
    """uvicorn's own line for a bad request says neither who nor why: ours replaces it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "Invalid HTTP request received."


def _protocols(header_timeout: float, max_per_address: int) -> dict[str, Any]:
    """uvicorn's HTTP and websocket protocols, logging who sent garbage before the
    websocket handshake (the ASGI app never sees those connections), and closing
    requests whose headers are late (igora.header_timeout)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol
    from uvicorn.protocols.websockets.auto import AutoWebSocketsProtocol

    out: dict[str, Any] = {}
    http: type[asyncio.Protocol] = AutoHTTPProtocol
    if hasattr(AutoHTTPProtocol, "send_400_response"):

        class HTTP(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
            def send_400_response(self, msg: str) -> None:
                log.warning("%s: disconnected, invalid HTTP request", peer_of(self))
                super().send_400_response(msg)

        http = HTTP
        logging.getLogger("uvicorn.error").addFilter(_QuietInvalidRequest())
    out["http"] = http_protocol(http, header_timeout, log, max_per_address)
    if AutoWebSocketsProtocol is not None and hasattr(AutoWebSocketsProtocol, "handle_connect"):

        class WS(AutoWebSocketsProtocol):  # type: ignore[misc, valid-type]
            def handle_connect(self, event: Any) -> None:
                super().handle_connect(event)
                status = getattr(getattr(self, "response", None), "status_code", 101)
                if status != 101:
                    log.warning(
                        "%s: disconnected, bad websocket handshake (HTTP %s)",
                        peer_of(self),
                        status,
                    )

        out["ws"] = WS
    return out


def run_market(
    host: str,
    port: int,
    data: Path | None,
    settings: MarketSettings | None = None,
    *,
    identity_data: Path | None = None,
    behind_tls: bool = False,
) -> None:
    """Serve the market until interrupted (SIGINT/SIGTERM flush the store and exit).

    A market with v3 rooms (``settings.secure``: all of them; ``settings.v3_rooms``:
    those) proves itself with the identity of folder ``identity_data`` (default:
    ``IGORA_DATA`` or the XDG data folder), made on first use; a market of v2 rooms only
    has no use for a key and reads none."""
    import uvicorn

    settings = settings or MarketSettings()
    settings.check(port)
    # pycrdt-websocket logs every message at DEBUG: keep our own debug lines readable.
    for noisy in ("igora.market.room", "igora.market.server", "redis"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, logging.getLogger().level))
    identity: Identity | None = None
    if settings.speaks_v3:
        identity, made = load_identity(identity_data)
        if made:
            log.info("market: made a new identity in %s", key_path(identity_data))
    redis = settings.redis
    if redis is not None:
        asyncio.run(check_redis(redis))  # one line and exit 2 if it does not answer
    sock = _listen(host, port)
    market = Market(data, settings, identity)
    where = f"storing rooms in {data}" if data else "in memory only (no --data)"
    if redis is not None:
        where += f", sharing them through Redis at {redis}"
    log.info(
        "market listening on ws://%s:%d, %s; limits: message %d bytes, %d connections "
        "(%d per address), %d rooms (%d per address), headers within %g s",
        host,
        port,
        where,
        settings.max_message,
        settings.max_connections,
        settings.max_per_address,
        settings.max_rooms,
        settings.max_rooms_per_address,
        settings.header_timeout,
    )
    if identity is not None:
        rooms = "every room" if settings.secure else "rooms " + ", ".join(sorted(settings.v3_rooms))
        admits = {
            "open": "any identity that proves itself",
            "list": "its members (igora market members add ID)",
            "invite": "its members and invitations (igora market invite)",
        }[settings.members]
        log.info(
            "market identity %s; protocol 3 in %s, admitting %s, bans enforced",
            identity.id,
            rooms,
            admits,
        )
        if not behind_tls and not _loopback(host):
            log.warning(
                "protocol 3 on %s over plain ws://: anyone on the path can read the "
                "traffic and act as an agent after its handshake; put a TLS proxy in "
                "front (wss://) and pass --behind-tls",
                host,
            )
    config = uvicorn.Config(
        market.app,
        ws_max_size=settings.max_message,
        ws_ping_interval=10,
        ws_ping_timeout=20,
        # No permessage-deflate: every frame goes to every agent and each connection
        # would compress it again with its own context; at 1,000 agents that was 40 %
        # of the market's time (docs/benchmarks.md). Frames are Yjs binary updates.
        ws_per_message_deflate=False,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=2,
        log_config=None,  # uvicorn's lines go through our format (igora.cli.setup_logging)
        **_protocols(settings.header_timeout, settings.max_per_address),
    )
    uvicorn.Server(config).run(sockets=[sock])
