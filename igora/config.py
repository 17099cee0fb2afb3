"""Where the market is: flags first, then the original Igora's environment names.

Environment (also read from a ``.env`` file in the working directory):
``YJS_ENV`` (``LOCAL`` or ``REMOTE``), ``YJS_LOCAL_URL`` (default ``ws://localhost:1234``),
``YJS_REMOTE_URL`` (either may list several replicas of one market, comma-separated),
``YJS_MARKET_ROOM`` (default ``market``), ``LLM_MODEL_NAME``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from .protocol import DEFAULT_LOCAL_URL, DEFAULT_ROOM

DEFAULT_HOST = "127.0.0.1"
"""Address the servers (market, gateway) listen on by default: this machine only."""


class ConfigError(ValueError):
    """A setting is missing or malformed; the message says which and how to fix it."""


_dotenv_loaded = False


def load_dotenv() -> None:
    """Read ``.env`` from the working directory once; real environment wins."""
    global _dotenv_loaded
    if _dotenv_loaded:
        return
    _dotenv_loaded = True
    path = Path.cwd() / ".env"
    if not path.is_file():
        return
    from dotenv import dotenv_values  # a dependency; imported only when there is a .env

    for key, value in dotenv_values(path).items():
        if value is not None:
            os.environ.setdefault(key, value)


def env(name: str, default: str | None = None) -> str | None:
    load_dotenv()
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def check_ws_url(url: str) -> str:
    """``url`` without its trailing slash, if it is a websocket URL with a host (and a
    valid port); ConfigError otherwise. The one check of a market URL, for flags, the
    environment and configuration files alike."""
    expected = "expected ws://host:port or wss://host"
    try:
        parsed = urlparse(url)
    except ValueError as exc:  # e.g. "ws://[::1": Invalid IPv6 URL
        raise ConfigError(f"market URL {url!r} is not a valid URL ({exc}): {expected}") from None
    if parsed.scheme not in ("ws", "wss") or not parsed.hostname:
        raise ConfigError(f"market URL {url!r} is not a websocket URL: {expected}")
    try:
        parsed.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ConfigError(f"market URL {url!r} has a bad port: use 1 to 65535") from None
    return url.rstrip("/")


def check_market_urls(text: str) -> str:
    """``text`` normalised, if it is one market URL or several comma-separated (replicas
    of one market, docs/market.md "Replicas"); ConfigError naming the bad one otherwise."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) > 1 and not all(parts):
        raise ConfigError(
            f"market URL list {text!r} has an empty item: expected ws://a:1234,ws://b:1234"
        )
    urls = [check_ws_url(p) for p in parts]
    if len(set(urls)) != len(urls):
        raise ConfigError(f"market URL list {text!r} names a URL twice")
    return ",".join(urls)


MAX_ROOM = 200  # characters; the market refuses longer room names
_NOT_IN_ROOM = set("/?#%\\")


def check_room(name: str) -> str:
    """``name`` if it is a room name: 1 to MAX_ROOM printable characters, no space and none
    of ``/ ? # % \\`` (it becomes the path of the room's URL); ConfigError otherwise."""
    if (
        not name
        or len(name) > MAX_ROOM
        or not name.isprintable()
        or any(c.isspace() or c in _NOT_IN_ROOM for c in name)
    ):
        raise ConfigError(
            f"room name {name[:80]!r}{'...' if len(name) > 80 else ''} is invalid: use 1 to "
            f"{MAX_ROOM} printable characters, without spaces or / ? # % \\"
        )
    return name


@dataclass(frozen=True)
class MarketAddress:
    """A market room. ``url`` may list several replicas of the market, comma-separated."""

    url: str
    room: str
    invite: str | None = None  # an invitation to a secure market, for a v3 session

    @property
    def room_urls(self) -> tuple[str, ...]:
        """The room's URL at each replica."""
        return tuple(f"{u}/{self.room}" for u in self.url.split(","))

    @property
    def room_url(self) -> str:
        return ",".join(self.room_urls)

    @property
    def http_url(self) -> str:
        """The HTTP address of the (first) market: ``ws://`` -> ``http://``, ``wss://`` ->
        ``https://`` (``/status``, ``/rooms/ROOM/view``)."""
        first = self.url.split(",")[0].rstrip("/")
        return "http" + first[2:] if first.startswith("ws") else first


def market_address(
    url: str | None = None, room: str | None = None, invite: str | None = None
) -> MarketAddress:
    """Resolve the market URL and room from arguments, then environment, then defaults;
    ``invite``: an invitation of the market's operator (``igora market invite``)."""
    source = ""
    if url is None:
        mode = (env("YJS_ENV", "LOCAL") or "LOCAL").upper()
        if mode == "REMOTE":
            url, source = env("YJS_REMOTE_URL"), "YJS_REMOTE_URL"
            if not url:
                raise ConfigError("YJS_ENV=REMOTE needs YJS_REMOTE_URL (e.g. wss://market.example)")
        elif mode == "LOCAL":
            url, source = env("YJS_LOCAL_URL", DEFAULT_LOCAL_URL), "YJS_LOCAL_URL"
        else:
            raise ConfigError(f"YJS_ENV must be LOCAL or REMOTE, not {mode!r}")
    room_source = ""
    if room is None:
        room, room_source = env("YJS_MARKET_ROOM", DEFAULT_ROOM), "YJS_MARKET_ROOM"
    return MarketAddress(
        _from(check_market_urls, str(url), source),
        _from(check_room, str(room), room_source),
        invite,
    )


def _from(check: Callable[[str], str], value: str, source: str) -> str:
    """``check(value)``; its error names the environment variable the value came from."""
    try:
        return check(value)
    except ConfigError as exc:
        if not source or os.environ.get(source) != value:
            raise
        raise ConfigError(f"{exc} (from {source})") from None


def data_dir() -> Path:
    """Default folder for the market's store: ``$IGORA_DATA`` or the XDG data folder."""
    explicit = env("IGORA_DATA")
    if explicit:
        return Path(explicit)
    base = env("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "igora"
