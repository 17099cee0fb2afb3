"""A v3 document as the market keeps it: its Yjs update log (bytes), not a ``Doc``.

The market does not apply updates as they come (docs/protocol-v3.md §2): it appends each
checked update to the document's log, merges the log into one update every
``MERGE_EVERY`` entries (``pycrdt.merge_updates``; for a long-lived document through a
``Doc`` made for the merge and let go, which drops the content of its deleted entries),
answers a subscriber with the merged state and a state vector with the diff of that
state (``pycrdt.get_update``). A log costs a few
hundred bytes where a ``Doc`` costs kilobytes.

``DocHistory`` takes a room's logs to the store (``store.Store``, table ``doc_updates``):
at most one transaction per ``FLUSH_INTERVAL`` while updates keep coming; a document
whose stored rows would pass ``MERGE_EVERY`` has its rows replaced by its merged state in
that same transaction, so a document is never more than ``MERGE_EVERY`` rows on disk.

A merge keeps the content of every item ever written, deleted or not (Yjs merges do not
collect garbage). That is right for the documents that gain and lose keys (§9's
``replace`` bounds them), not for ``board``, which its owner rewrites whole every second:
its log is ``rewritten``, merged at each update through a ``Doc``, whose encoding has the
deleted items' content collected, so it stays the size of one summary.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any

from pycrdt import Doc, get_state, get_update, merge_updates

from ..store import Store, WriteBehind

MERGE_EVERY = 64
"""Entries of a log merged into one (protocol-v3.md §11: a starting value)."""

EMPTY_UPDATE = b"\x00\x00"
EMPTY_STATE_VECTOR = b"\x00"

log = logging.getLogger("igora.market")


def long_lived(name: str) -> bool:
    """Whether a document lives across tasks (``a/``, ``w/``, ``in/``, ``dir``...), not
    a task's (``p/``, ``r/``)."""
    return name[:2] not in ("p/", "r/")


class DocLog:
    """One document's updates, merged every ``MERGE_EVERY``."""

    __slots__ = (
        "collect",
        "entries",
        "epoch",
        "idle",
        "owned",
        "owner",
        "rewritten",
        "size",
        "stored",
    )

    def __init__(
        self,
        entries: list[bytes] | None = None,
        epoch: int = 0,
        collect: bool = False,
        rewritten: bool = False,
    ) -> None:
        self.entries: list[bytes] = list(entries or [])
        # A long-lived document's merge goes through a Doc, which collects the content
        # of deleted entries (merge_updates keeps it): its log is then about the size
        # of its owner's copy (~10 KB for an inbox where merging alone kept ~250 KB, in
        # ~1 ms per 64 updates), same state vector.
        self.collect = collect or rewritten
        self.rewritten = rewritten  # merged (through a Doc) at each update: ``board``
        self.size = sum(len(e) for e in self.entries)  # bytes held
        self.stored = len(self.entries)  # rows of it in the store
        self.epoch = epoch  # of its last replace (protocol-v3.md §9); 0: none since loaded
        self.idle = time.monotonic()  # since when nobody wrote or read it (task documents)
        # The identity that owns it and the room's bytes by owner, which ``size`` is
        # counted in while set (``own``): the per-identity limit (protocol-v3.md §12.1).
        self.owner = ""
        self.owned: Counter[str] | None = None

    def own(self, owner: str, owned: Counter[str]) -> None:
        """Count this log's bytes, from now on, as ``owner``'s in ``owned``."""
        self.owner, self.owned = owner, owned
        owned[owner] += self.size

    def disown(self) -> None:
        """Stop counting this log's bytes (it was dropped or replaced)."""
        if self.owned is not None:
            self.owned[self.owner] -= self.size
            if self.owned[self.owner] <= 0:
                del self.owned[self.owner]
            self.owned = None

    def append(self, update: bytes) -> None:
        self.entries.append(update)
        self.size += len(update)
        if self.owned is not None:
            self.owned[self.owner] += len(update)
        self.idle = time.monotonic()
        if self.rewritten or len(self.entries) >= MERGE_EVERY:
            self._merge()

    def _merge(self) -> None:
        if len(self.entries) > 1:
            merged = merge_updates(*self.entries)
            if self.collect:
                doc: Doc[Any] = Doc()
                doc.apply_update(merged)
                merged = doc.get_update()
            self.entries = [merged]
            if self.owned is not None:
                self.owned[self.owner] += len(merged) - self.size
            self.size = len(merged)

    @property
    def empty(self) -> bool:
        return not self.entries

    def state(self) -> bytes:
        """The whole document as one update."""
        self._merge()
        return self.entries[0] if self.entries else EMPTY_UPDATE

    def vector(self) -> bytes:
        """The document's state vector."""
        return get_state(self.state()) if self.entries else EMPTY_STATE_VECTOR

    def diff(self, state_vector: bytes) -> bytes:
        """What a holder of ``state_vector`` lacks (ValueError: not a state vector)."""
        return get_update(self.state(), state_vector)


def rewritten(name: str) -> bool:
    """Whether the document ``name`` is rewritten whole by its owner (``board``)."""
    return name.partition("@")[0] == "board"


class DocHistory:
    """The updates of one v3 room on their way to the store. ``writing`` False: another
    replica stores the room (it holds its persister lease); this one only reads it."""

    def __init__(self, room: str, store: Store, writing: bool = True) -> None:
        self.room = room
        self.store = store
        self.writing = writing
        self.pending: list[tuple[str, bytes]] = []  # appended, not yet handed to the store
        self.dropped: set[str] = set()  # documents to remove from the store
        self._redo: set[str] = set()  # documents whose last write failed: store them whole
        self.logs: dict[str, DocLog] = {}  # the room's documents (the room adds to it)
        self._lock = asyncio.Lock()
        self._writer = WriteBehind(
            self.flush,
            lambda: bool(self.pending or self.dropped or self._redo),
            f"room {room} (documents)",
        )

    def load(self) -> dict[str, DocLog]:
        """The room's documents from the store, each log merged (and stored merged)."""
        logs = {}
        squash: dict[str, bytes | None] = {}
        for name, entries in self.store.load_documents(self.room).items():
            doc = DocLog(entries, collect=long_lived(name), rewritten=rewritten(name))
            if len(entries) > 1:
                squash[name] = doc.state()
                doc.stored = 1
            logs[name] = doc
        if squash and self.writing:
            self.store.write_documents(self.room, [], squash)
        if logs:
            log.info("room %s: %d document(s) loaded from the store", self.room, len(logs))
        self.logs = logs
        return logs

    def appended(self, name: str, update: bytes) -> None:
        """Document ``name`` took ``update``: write it soon."""
        if not self.writing:
            return
        self.pending.append((name, update))
        self._writer.soon()

    def drop(self, name: str) -> None:
        """Document ``name`` is gone: remove its rows soon. Its updates still pending
        stay in the list (filtering it at each drop cost O(pending) per task): ``_batch``
        skips the updates of a document it stores whole or removes."""
        if not self.writing:
            return
        self.dropped.add(name)
        self._writer.soon()

    def _batch(self) -> tuple[list[tuple[str, bytes]], dict[str, bytes | None]]:
        """What to write now (no await between reading the logs and this)."""
        pending, self.pending = self.pending, []
        # Stored whole (or removed): documents dropped (a name written again since
        # then holds only what came after the drop), whose last write failed, or whose
        # rows would pass MERGE_EVERY.
        whole = self.dropped | self._redo
        self.dropped, self._redo = set(), set()
        counts: dict[str, int] = {}
        for name, _ in pending:
            counts[name] = counts.get(name, 0) + 1
        for name, n in counts.items():
            doc = self.logs.get(name)
            if doc is not None and doc.stored + n > MERGE_EVERY:
                whole.add(name)
        replaces: dict[str, bytes | None] = {}
        for name in whole:
            doc = self.logs.get(name)
            replaces[name] = doc.state() if doc is not None else None
            if doc is not None:
                doc.stored = 1
        for name, n in counts.items():
            doc = self.logs.get(name)
            if doc is not None and name not in whole:
                doc.stored += n
        appends = [(n, u) for n, u in pending if n not in whole]
        return appends, replaces

    async def flush(self) -> None:
        async with self._lock:
            appends, replaces = self._batch()
            if not appends and not replaces:
                return
            try:
                await asyncio.to_thread(self.store.write_documents, self.room, appends, replaces)
            except BaseException:
                # The transaction did not happen: store those documents whole next time.
                self._redo |= {n for n, _ in appends} | set(replaces)
                self._writer.soon()
                raise

    async def replace(self) -> None:
        """Store the room whole: each document as its merged state, the documents no
        longer in the room removed (when this replica starts storing the room: its
        documents hold whatever the last holder had not written)."""
        if not self.writing:
            return
        async with self._lock:
            self.pending, self.dropped, self._redo = [], set(), set()
            replaces: dict[str, bytes | None] = {}
            try:
                stored = await asyncio.to_thread(self.store.document_names, self.room)
                replaces = {name: None for name in stored - self.logs.keys()}
                for name, doc in self.logs.items():
                    replaces[name] = doc.state()
                    doc.stored = 1
                await asyncio.to_thread(self.store.write_documents, self.room, [], replaces)
            except Exception:
                self._redo |= set(self.logs) | set(replaces)  # whole, at the next flush
                self._writer.soon()
                log.exception("room %s: storing the room whole failed", self.room)

    def flush_sync(self) -> None:
        """Write everything now, blocking (at shutdown)."""
        appends, replaces = self._batch()
        if appends or replaces:
            self.store.write_documents(self.room, appends, replaces)
