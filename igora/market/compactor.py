"""When a room compacts, and what it does with the result.

The rewrite itself is ``compaction.compact_doc``, its schedule
``compaction.CompactionSchedule`` (every ``every`` tasks gone from the room, or once they
stop leaving); here is its end: the room's document is swapped for the compacted one
(``MarketRoom.swap``) and stored as the room's whole history (``RoomHistory.replace``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from pycrdt import Doc

from ..updates import is_panic
from .compaction import CompactionSchedule, compact_doc, release_memory
from .persistence import RoomHistory

log = logging.getLogger("igora.market")


class RoomCompactor:
    """The compaction schedule of one room. ``doc`` gives the room's current document,
    ``swap`` replaces it (with no await in between)."""

    def __init__(
        self,
        name: str,
        every: int,
        doc: Callable[[], Doc[Any]],
        swap: Callable[[Doc[Any]], None],
        history: RoomHistory,
    ) -> None:
        self.name = name
        self._doc = doc
        self._swap = swap
        self._history = history
        self.compactions = 0
        self._dead: set[str] = set()  # tasks found gone by the last compaction
        self.schedule = CompactionSchedule(every, self._pass)

    def task_left(self, count: int = 1) -> None:
        """``count`` tasks left ``done`` (so the live document)."""
        self.schedule.task_left(count)

    def cancel(self) -> None:
        self.schedule.cancel()

    async def _pass(self) -> bool:
        await self.compact()
        return bool(self._dead)

    async def compact(self) -> None:
        """Replace the room's document by one without the tombstones of finished tasks
        (igora.market.compaction), and store it as the room's whole history.

        The heavy part reads a snapshot in a thread; what arrived meanwhile is applied
        to the new document, which replaces the old one with no await in between.
        Peers keep their own documents: nothing is sent to them."""
        started = time.monotonic()
        doc = self._doc()
        try:
            fresh, result, size = await compact_doc(doc, self._dead)
            if self._doc() is not doc:
                return
        except BaseException as exc:
            if not isinstance(exc, Exception) and not is_panic(exc):
                raise
            log.exception(
                "room %s: compaction failed; the room goes on, never compacted "
                "again until the market restarts (please report this)",
                self.name,
            )
            self.schedule.stop()
            self._dead = set()
            return
        self._swap(fresh)
        del doc, fresh
        release_memory()
        self._dead = result.dead
        self.compactions += 1
        took = time.monotonic() - started
        # A pass that collects nothing only marks the tasks gone since the last one.
        log.log(
            logging.INFO if result.tasks else logging.DEBUG,
            "room %s: compacted, %d -> %d bytes: the history of %d finished task(s) "
            "collected (%d deleted items) in %.0f ms; %d more next time",
            self.name,
            size,
            len(result.update),
            result.tasks,
            result.collected,
            took * 1000,
            len(result.dead),
        )
        await self._history.replace()
