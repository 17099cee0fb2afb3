"""A warning written at most once per second and key, with the count of those hidden.

For lines an attacker can trigger at will (refused connections, late headers): a flood
must not flood the log too.
"""

from __future__ import annotations

import logging
import time
from typing import Any

MAX_KEYS = 10_000
"""Keys remembered at most (past it, all are forgotten)."""


class RateLimitedLog:
    """``log.warning`` at most once per second per ``key``; the next line written for
    that key says how many were not: "(N more in the last second)", or with a key,
    "(N more from KEY in the last second)"."""

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self._seen: dict[str, tuple[float, int]] = {}  # key -> last written, hidden since

    def __call__(self, message: str, *args: Any, key: str = "") -> None:
        now = time.monotonic()
        last, hidden = self._seen.get(key, (0.0, 0))
        if now - last < 1.0:
            self._seen[key] = (last, hidden + 1)
            return
        source = f" from {key}" if key else ""
        more = f" ({hidden} more{source} in the last second)" if hidden else ""
        self.log.warning(message + more, *args)
        self._seen[key] = (now, 0)
        if len(self._seen) > MAX_KEYS:
            self._seen.clear()
