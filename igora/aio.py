"""Waiting and stopping in asyncio without losing a cancellation.

``asyncio.wait_for`` before Python 3.12 returns the result of what it waits for when
that completes in the very turn its own task is cancelled: the cancellation is dropped,
and a task told to stop goes on. A v3 session stopped as a handshake frame arrived (an
asker closed while it reconnected to a restarted market) went on to its ``WELCOME``,
stayed connected for good, and its ``stop`` waited for it forever. Igora waits with
``within`` instead, and stops its connection tasks with ``stop_task``, which bounds the
wait for the end and cancels again a task that goes on.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")

STOP_PATIENCE = 15.0
"""Seconds a cancelled task has to end before it is cancelled again: more than the 10 s
a websocket's closing handshake may take (``websockets``' ``close_timeout``)."""
STOP_TRIES = 3
"""Cancellations sent before ``stop_task`` gives up on a task (and says so)."""


async def within(awaitable: Awaitable[T], seconds: float) -> T:
    """``await awaitable``, or ``asyncio.TimeoutError`` after ``seconds`` (it is then
    cancelled); a cancellation of the caller always propagates."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await awaitable
    inner = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({inner}, timeout=seconds)
    finally:
        if not inner.done():
            inner.cancel()
    if not done:
        raise asyncio.TimeoutError
    return inner.result()


async def stop_task(
    task: asyncio.Task[Any],
    what: str,
    log: logging.Logger,
    patience: float = STOP_PATIENCE,
    tries: int = STOP_TRIES,
) -> bool:
    """Cancel ``task`` and wait for its end, ``patience`` s at most per cancellation,
    ``tries`` cancellations at most; whether it ended. A task still running past that
    is logged (``what`` names it) rather than waited for without end. Its outcome
    (cancelled, an exception) is consumed."""
    for attempt in range(1, tries + 1):
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=patience)
        if done:
            if not task.cancelled():
                task.exception()  # retrieved: ending with one is no news while stopping
            return True
        if attempt < tries:
            log.warning(
                "%s still runs %g s after it was cancelled; cancelling it again (%d of %d)",
                what,
                patience,
                attempt + 1,
                tries,
            )
    log.error(
        "%s did not stop after %d cancellations, %g s each; left running", what, tries, patience
    )
    return False
