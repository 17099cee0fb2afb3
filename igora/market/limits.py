"""The market's limits and settings: their defaults, their check at start, and the
connection count.

Limits on rooms in memory are kept by ``server.MarketServer`` (which loads and unloads
them), on message size by uvicorn (``run``), on request headers by
``igora.header_timeout``.
"""

from __future__ import annotations

import logging
from collections import Counter

from ..config import MAX_ROOM, ConfigError
from ..ratelog import RateLimitedLog

DEFAULT_PORT = 1234
DEFAULT_MAX_MESSAGE = 16 * 1024 * 1024
DEFAULT_MAX_CONNECTIONS = 2_000
DEFAULT_MAX_PER_ADDRESS = 500
DEFAULT_COMPACT_EVERY = 500  # finished tasks between two compactions of a room (0: never)
DEFAULT_ROOM_IDLE = 60.0  # seconds a room with no connection stays in memory (with a store)
DEFAULT_TASK_RETENTION = 600.0  # seconds an unread, unwritten v3 task document is kept
DEFAULT_MAX_ROOMS = 1_000  # rooms in memory; past it the one idle the longest is unloaded
DEFAULT_MAX_ROOMS_PER_ADDRESS = 100  # rooms in memory that one IP address loaded
MAX_ROOM_NAME = MAX_ROOM

log = logging.getLogger("igora.market")


def check_limits(
    port: int,
    max_message: int,
    max_connections: int,
    max_per_address: int,
    room_idle: float,
    compact_every: int = 0,
    max_rooms: int = 1,
    max_rooms_per_address: int = 1,
    header_timeout: float = 1.0,
    task_retention: float = DEFAULT_TASK_RETENTION,
) -> None:
    """Raise ConfigError, naming the command-line flag, for a limit out of its range."""
    if not 0 < port < 65536:
        raise ConfigError(f"--port {port} is not a TCP port (1-65535)")
    for flag, seconds in (
        ("--room-idle", room_idle),
        ("--header-timeout", header_timeout),
        ("--task-retention", task_retention),
    ):
        if not 0 < seconds < float("inf"):
            raise ConfigError(f"{flag} must be a positive number of seconds, not {seconds}")
    for flag, value, least in (
        ("--max-message", max_message, 1024),
        ("--max-connections", max_connections, 1),
        ("--max-per-address", max_per_address, 1),
        ("--compact-every", compact_every, 0),
        ("--max-rooms", max_rooms, 1),
        ("--max-rooms-per-address", max_rooms_per_address, 1),
    ):
        if value < least:
            raise ConfigError(f"{flag} must be at least {least}, not {value}")


class Connections:
    """The websocket connections open, in all and per IP address, and their limits."""

    def __init__(self, max_connections: int, max_per_address: int) -> None:
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self.per_address: Counter[str] = Counter()
        self.log_refusal = RateLimitedLog(log)

    @property
    def total(self) -> int:
        return sum(self.per_address.values())

    def refusal(self, room: str, address: str) -> str | None:
        """Why a connection from ``address`` to ``room`` is refused (None: it is not)."""
        if len(room) > MAX_ROOM_NAME or not room.isprintable():
            return "room name too long or not printable"
        if self.total >= self.max_connections:
            return f"{self.max_connections} connections already"
        if self.per_address[address] >= self.max_per_address:
            return f"{self.max_per_address} connections from {address} already"
        return None

    def refused(self, address: str, peer: str, reason: str) -> None:
        """Log a refusal: one line per address and second at most."""
        self.log_refusal("%s: refused, %s", peer, reason, key=address)

    def opened(self, address: str) -> None:
        self.per_address[address] += 1

    def closed(self, address: str) -> None:
        self.per_address[address] -= 1
        if self.per_address[address] <= 0:
            del self.per_address[address]
