"""The market keys an agent trusts: ``DATA/known_markets`` (docs/security.md §3).

An agent checks the key a market proves in its ``WELCOME`` against the one it expects:
given (``market_key=``, ``--market-key``, ``ws://host/room#key=ID``), else the one this
file holds for the market's URL, else it trusts the key on first use and adds a line.
One line per market: ``<market URL> <market id>`` (the URL without the room: the key is
the market's, whatever the room), mode 0600. A market that proves another key than its
line is refused, as ssh refuses a host whose key changed: the error names the file and
the line to remove once the user knows the new key is right.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ..config import data_dir
from ..errors import IgoraError
from ..identity import IdentityError, public_key

FILE = "known_markets"


class KnownMarketsError(IgoraError):
    """``known_markets`` cannot be read or holds a line that is not ``URL MARKET-ID``."""


class MarketKeyError(IgoraError):
    """The market proved a key other than the one expected: refused."""


def path(data: Path | None = None) -> Path:
    return (data if data is not None else data_dir()) / FILE


def _lines(file: Path) -> list[tuple[int, str, str]]:
    """(line number, URL, market id) of every entry; blank lines and ``#`` comments are
    skipped."""
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise KnownMarketsError(f"cannot read {file}: {exc}") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise IdentityError("two fields expected")
            public_key(parts[1])
        except IdentityError:
            raise KnownMarketsError(
                f"{file} line {n} is not 'URL MARKET-ID' ({line[:80]!r}); fix or remove it"
            ) from None
        out.append((n, parts[0], parts[1]))
    return out


def check(url: str, key: str, data: Path | None = None) -> bool:
    """Whether ``url``'s key is known: True if a line gives ``key``, False if no line
    names ``url``; ``MarketKeyError`` if lines name it with another key."""
    file = path(data)
    pinned = [(n, k) for n, u, k in _lines(file) if u == url]
    if not pinned or any(k == key for _, k in pinned):
        return bool(pinned)
    n, old = pinned[0]
    raise MarketKeyError(
        f"the market at {url} proved the key {key}, but {file} line {n} holds {old} for it: "
        "THE MARKET'S KEY HAS CHANGED. Someone may be impersonating the market (a machine "
        "in the middle), or its operator gave it a new key (a new data folder). Compare "
        f"with the id the market prints at start or shows at /status; if the new key is "
        f"right, remove line {n} of {file} and connect again. Refusing to connect."
    )


def remember(url: str, key: str, data: Path | None = None) -> Path:
    """Add ``url key`` to the file (made 0600, its folder 0700, when missing)."""
    file = path(data)
    try:
        file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    except OSError as exc:
        raise KnownMarketsError(f"cannot write {file}: {exc.strerror}") from None
    try:
        os.write(fd, f"{url} {key}\n".encode())  # one write: whole lines when agents race
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    return file
