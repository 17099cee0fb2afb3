"""How an agent waits between two attempts to reach its market, and what it logs.

Shared by the v2 ``Agent`` (igora.agent) and the v3 ``Session`` (igora.v3.session): the
first retry comes after ``BACKOFF_START`` s, each next one after twice the delay, up to
``BACKOFF_MAX`` s (or the agent's own limit), each delay with +/-20 % jitter so that the
agents of a restarted market do not all come back in the same millisecond.
"""

from __future__ import annotations

import asyncio
import logging
import random

BACKOFF_START = 0.2
BACKOFF_MAX = 5.0


class Backoff:
    """The delay before the next attempt: ``reset`` after a connection, ``wait`` after a
    failure."""

    def __init__(self, limit: float = BACKOFF_MAX) -> None:
        self.limit = limit
        self.delay = BACKOFF_START

    def reset(self) -> None:
        self.delay = BACKOFF_START

    async def wait(self) -> None:
        """Sleep the current delay (with jitter), then double it up to the limit."""
        await asyncio.sleep(self.delay * (0.8 + 0.4 * random.random()))
        self.delay = min(self.delay * 2, self.limit)


def log_unreachable(
    log: logging.Logger, name: str, url: str, exc: BaseException, delay: float, attempt: int
) -> None:
    """One line per failed attempt: a warning, except for the very first attempt (a role
    started before its market is normal; ``start`` reports it if it lasts)."""
    log.log(
        logging.WARNING if attempt else logging.DEBUG,
        "%s: market %s unreachable (%s); retrying in %.1f s",
        name,
        url,
        exc or type(exc).__name__,
        delay,
    )
