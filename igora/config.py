"""Where the market is: flags first, then the original Igora's environment names.

Environment (also read from a ``.env`` file in the working directory):
``YJS_ENV`` (``LOCAL`` or ``REMOTE``), ``YJS_LOCAL_URL`` (default ``ws://localhost:1234``),
``YJS_REMOTE_URL``, ``YJS_MARKET_ROOM`` (default ``market``), ``LLM_MODEL_NAME``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from .protocol import DEFAULT_LOCAL_URL, DEFAULT_ROOM


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
    try:
        from dotenv import dotenv_values
    except ImportError:  # pragma: no cover - python-dotenv is a dependency
        return
    for key, value in dotenv_values(path).items():
        if value is not None:
            os.environ.setdefault(key, value)


def env(name: str, default: str | None = None) -> str | None:
    load_dotenv()
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def check_ws_url(url: str) -> str:
    parsed = urlparse(url)
    if parsed.scheme not in ("ws", "wss") or not parsed.hostname:
        raise ConfigError(
            f"market URL {url!r} is not a websocket URL: expected ws://host:port or wss://host"
        )
    try:
        parsed.port
    except ValueError as exc:
        raise ConfigError(f"market URL {url!r} has a bad port") from exc
    return url.rstrip("/")


@dataclass(frozen=True)
class MarketAddress:
    url: str
    room: str

    @property
    def room_url(self) -> str:
        return f"{self.url}/{self.room}"


def market_address(url: str | None = None, room: str | None = None) -> MarketAddress:
    """Resolve the market URL and room from arguments, then environment, then defaults."""
    if url is None:
        mode = (env("YJS_ENV", "LOCAL") or "LOCAL").upper()
        if mode == "REMOTE":
            url = env("YJS_REMOTE_URL")
            if not url:
                raise ConfigError("YJS_ENV=REMOTE needs YJS_REMOTE_URL (e.g. wss://market.example)")
        elif mode == "LOCAL":
            url = env("YJS_LOCAL_URL", DEFAULT_LOCAL_URL)
        else:
            raise ConfigError(f"YJS_ENV must be LOCAL or REMOTE, not {mode!r}")
    room = room if room is not None else env("YJS_MARKET_ROOM", DEFAULT_ROOM)
    if not room or "/" in room or len(room) > 200:
        raise ConfigError(f"room name {room!r} is invalid: use letters, digits, - or _")
    return MarketAddress(check_ws_url(str(url)), str(room))


def data_dir() -> Path:
    """Default folder for the market's store: ``$IGORA_DATA`` or the XDG data folder."""
    explicit = env("IGORA_DATA")
    if explicit:
        return Path(explicit)
    base = env("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "igora"
