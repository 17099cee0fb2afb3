"""The market's limits and settings: their defaults, their check at start, and the
connection count.

Limits on rooms in memory are kept by ``server.MarketServer`` (which loads and unloads
them), on message size by uvicorn (``run``), on request headers by
``igora.header_timeout``.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

from ..config import MAX_ROOM, ConfigError
from ..credits.pricing import DEFAULT_GRANT
from ..header_timeout import DEFAULT_HEADER_TIMEOUT
from ..ratelog import RateLimitedLog
from .v3.bank import DEFAULT_RECEIPT_WAIT

DEFAULT_PORT = 1234
DEFAULT_MAX_MESSAGE = 16 * 1024 * 1024
DEFAULT_MAX_CONNECTIONS = 2_000
DEFAULT_MAX_PER_ADDRESS = 500
DEFAULT_COMPACT_EVERY = 500  # finished tasks between two compactions of a room (0: never)
DEFAULT_ROOM_IDLE = 60.0  # seconds a room with no connection stays in memory (with a store)
DEFAULT_TASK_RETENTION = 600.0  # seconds an unread, unwritten v3 task document is kept
DEFAULT_MAX_IDENTITY_BYTES = 256 * 1024 * 1024  # of documents one identity owns in a v3 room
DEFAULT_MAX_ROOMS = 1_000  # rooms in memory; past it the one idle the longest is unloaded
DEFAULT_MAX_ROOMS_PER_ADDRESS = 100  # rooms in memory that one IP address loaded
MAX_ROOM_NAME = MAX_ROOM

log = logging.getLogger("igora.market")


@dataclass(frozen=True)
class MarketSettings:
    """What ``igora market`` is told, beside where it listens and stores: its limits,
    which rooms speak protocol 3 and whom they admit, Redis, and credits. One value from
    the command line to ``run_market`` to ``app.Market``; ``check`` names the flag of a
    limit out of range."""

    max_message: int = DEFAULT_MAX_MESSAGE
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_per_address: int = DEFAULT_MAX_PER_ADDRESS
    room_idle: float = DEFAULT_ROOM_IDLE
    task_retention: float = DEFAULT_TASK_RETENTION
    max_identity_bytes: int = DEFAULT_MAX_IDENTITY_BYTES
    compact_every: int = DEFAULT_COMPACT_EVERY
    max_rooms: int = DEFAULT_MAX_ROOMS
    max_rooms_per_address: int = DEFAULT_MAX_ROOMS_PER_ADDRESS
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    secure: bool = False  # every room speaks protocol 3
    v3_rooms: frozenset[str] = frozenset()  # these rooms speak protocol 3
    broker_keys: frozenset[str] = frozenset()  # may hold a secure room's broker lease
    members: str = "open"  # whom a v3 room admits (``members.Membership``)
    redis: str | None = None  # rooms shared with the other markets on this Redis
    grant: int = DEFAULT_GRANT  # credits given to a new identity
    receipt_wait: float = DEFAULT_RECEIPT_WAIT  # seconds before a run is charged unsigned
    model_params: tuple[tuple[str, str], ...] = ()  # pinned sizes: (model name, billions)

    @property
    def speaks_v3(self) -> bool:
        """Some room speaks protocol 3: the market needs its identity."""
        return self.secure or bool(self.v3_rooms)

    def check(self, port: int = DEFAULT_PORT) -> None:
        """Raise ConfigError, naming the command-line flag, for a limit out of its range."""
        if not 0 < port < 65536:
            raise ConfigError(f"--port {port} is not a TCP port (1-65535)")
        for flag, seconds in (
            ("--room-idle", self.room_idle),
            ("--header-timeout", self.header_timeout),
            ("--task-retention", self.task_retention),
        ):
            if not 0 < seconds < float("inf"):
                raise ConfigError(f"{flag} must be a positive number of seconds, not {seconds}")
        for flag, value, least in (
            ("--max-message", self.max_message, 1024),
            ("--max-identity-bytes", self.max_identity_bytes, 1024),
            ("--max-connections", self.max_connections, 1),
            ("--max-per-address", self.max_per_address, 1),
            ("--compact-every", self.compact_every, 0),
            ("--max-rooms", self.max_rooms, 1),
            ("--max-rooms-per-address", self.max_rooms_per_address, 1),
        ):
            if value < least:
                raise ConfigError(f"{flag} must be at least {least}, not {value}")
        pinned = [name for name, _ in self.model_params]
        twice = sorted({n for n in pinned if pinned.count(n) > 1})
        if twice:
            raise ConfigError(f"--model-params pins {', '.join(twice)} more than once")
        if self.model_params and not self.speaks_v3:
            raise ConfigError(
                "--model-params prices credits, which only protocol 3 rooms keep: "
                "add --secure or --v3-room ROOM"
            )


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
