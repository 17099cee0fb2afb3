"""What a room writes to the store (``store.Store``), and how it reads its history back.

A room hands every update it applies to its ``RoomHistory``, which writes a lone update
at once and a stream of them at most once per ``FLUSH_INTERVAL``; finished tasks (entries
of ``done`` in a final state) are copied to the archive the same way. The history of a
room is what is stored, what is being stored and what is pending: ``history`` gives all
of it, for a room that must rebuild its document (``replay``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from pycrdt import Doc

from ..updates import is_panic
from .store import SQUASH_AFTER, Store, WriteBehind

log = logging.getLogger("igora.market")


def replay(name: str, updates: list[bytes]) -> Doc[Any]:
    """A new document holding a room's history, leaving out any update that fails."""
    doc: Doc[Any] = Doc()
    for i, update in enumerate(updates):
        try:
            doc.apply_update(update)
        except Exception:
            log.exception("room %s: a stored update could not be applied", name)
        except BaseException as exc:
            if not is_panic(exc):
                raise
            log.error("room %s: a stored update made pycrdt panic; left out", name)
            return replay(name, updates[:i] + updates[i + 1 :])
    return doc


class RoomHistory:
    """The updates and finished tasks of one room on their way to the store.

    ``state`` gives the room's current document state (one update), which replaces the
    stored rows once they are more than ``SQUASH_AFTER``. ``writing`` False: another
    process stores the room (a replica holding its lease, ``replicas``); this one only
    reads the store."""

    def __init__(
        self, name: str, store: Store, state: Callable[[], bytes], writing: bool = True
    ) -> None:
        self.name = name
        self.store = store
        self._state = state
        self.writing = writing
        self.pending: list[bytes] = []  # applied, not yet handed to the store
        self._writing: list[bytes] = []  # handed to the store, not yet committed
        self._archive: list[dict[str, Any]] = []
        self._lock = asyncio.Lock()
        self._writer = WriteBehind(
            self.flush, lambda: bool(self.pending or self._archive), f"room {name}"
        )

    def load(self) -> Doc[Any]:
        """The room's document rebuilt from the store; a history of several rows is
        squashed into one."""
        updates = self.store.load(self.name)
        doc = replay(self.name, updates)
        if len(updates) > 1 and self.writing:
            self.store.replace(self.name, doc.get_update())
        if updates:
            log.info("room %s: loaded from the store", self.name)
        return doc

    def history(self) -> list[bytes]:
        """Every update the room applied: stored, being stored and pending."""
        return self.store.load(self.name) + self._writing + self.pending

    def updated(self, update: bytes) -> None:
        """The room applied ``update``: write it soon."""
        if not self.writing:
            return
        self.pending.append(update)
        self._writer.soon()

    def finished(self, task: dict[str, Any]) -> None:
        """A task reached a final state: archive it (only in a durable store)."""
        if self.store.durable and self.writing:
            self._archive.append(task)

    async def flush(self) -> None:
        async with self._lock:
            await self._flush()

    async def _flush(self) -> None:
        updates, self.pending = self.pending, []
        archive, self._archive = self._archive, []
        try:
            if archive:
                await asyncio.to_thread(self.store.archive, self.name, archive)
        except BaseException:
            self._archive[:0] = archive
            self.pending[:0] = updates
            raise
        if not updates:
            return
        self._writing = updates
        try:
            rows = await asyncio.to_thread(self.store.append, self.name, updates)
        except BaseException:
            self.pending[:0] = updates
            raise
        finally:
            self._writing = []
        if rows > SQUASH_AFTER:
            state = self._state()
            self.pending = []  # the state holds them
            await asyncio.to_thread(self.store.replace, self.name, state)

    async def replace(self) -> None:
        """Store the room's current state as its whole history (after a compaction, or
        when this replica starts storing the room)."""
        if not self.writing:
            return
        async with self._lock:
            pending, self.pending = self.pending, []  # the new state holds them
            try:
                await asyncio.to_thread(self.store.replace, self.name, self._state())
            except Exception:
                self.pending[:0] = pending  # the old history stays; these go after it
                log.exception("room %s: storing the compacted room failed", self.name)

    def flush_sync(self) -> None:
        """Write everything now, blocking (at shutdown, when the loop is ending)."""
        if self._archive:
            self.store.archive(self.name, self._archive)
            self._archive = []
        if self.pending:
            self.store.append(self.name, self.pending)
            self.pending = []
