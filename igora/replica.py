"""An agent's replica of its room's document: the maps, the observers that follow the
document across rebuilds, and the compaction that rebuilds it.

A process connected for months must not hold every task it ever saw: as the market
compacts its rooms, every agent compacts its own replica (``Replica.compact``,
docs/faults.md "Agents that run for months"), so it holds the live tasks only. The
connection to the market is ``igora.agent.Agent``, built on this.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pycrdt import Doc, Map, Subscription, TransactionEvent

from .market.compaction import CompactionSchedule, compact_doc, release_memory
from .protocol import KANBAN, MapName

COMPACT_EVERY = 500  # tasks gone from ``done`` between two compactions of the document

KeyChanges = dict[str, dict[str, Any]]


def discard(mp: Map[Any], key: str) -> None:
    """Delete ``key`` from ``mp`` if there. ``Map.pop`` reads (and converts) the value
    first, a task-sized dict each time."""
    if key in mp:
        del mp[key]


@dataclass(eq=False)
class Observer:
    """An observer of one top-level map, kept by the replica across document rebuilds."""

    name: MapName
    callback: Callable[[Any], None]
    deep: bool
    subscription: Subscription | None = None


class Replica:
    """A document with the maps of the protocol bound, observers that survive its
    rebuilds, and the compaction that rebuilds it once enough tasks have left ``done``.

    Subclasses override ``_on_doc_update`` to hear every transaction."""

    def __init__(
        self, name: str, log: logging.Logger, origin: str, compact_every: int = COMPACT_EVERY
    ) -> None:
        self.name = name
        self.log = log
        self._origin = origin
        self.doc: Doc[Any] = Doc()
        self.maps: dict[MapName, Map[Any]] = {}
        self._bind_maps()
        self._observers: list[Observer] = []
        self.compactions = 0
        self.collected = 0  # finished tasks whose history the compactions dropped
        self._dead: set[str] = set()  # tasks found gone by the last compaction
        self._schedule = CompactionSchedule(compact_every, self._pass)
        self._doc_subscription = self.doc.observe(self._on_doc_update)
        self.observe_keys(MapName.DONE, self._on_done_keys)

    def _on_doc_update(self, event: TransactionEvent) -> None:
        """Called after each transaction of the document, local or remote."""

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """A transaction of the document, with this replica's id as its origin."""
        with self.doc.transaction(origin=self._origin):
            yield

    # ---------------------------------------------------------------- observers
    def observe_keys(self, name: MapName, callback: Callable[[KeyChanges], None]) -> Observer:
        """Call ``callback(changes)`` after each transaction that changes the map ``name``;
        ``changes`` maps each changed key to ``{"action": "add" | "update" | "delete",
        "oldValue": ..., "newValue": ...}``. Cheaper than ``Map.observe``, which builds an
        event object and walks every value again (~20 us per task-sized change, paid by
        every agent for every change of the room). The callback must not read or write
        the document (it runs inside the transaction). It follows the document across
        rebuilds (``compact``); ``unobserve`` ends it."""
        return self._observe(Observer(name, callback, deep=False))

    def observe_deep(self, name: MapName, callback: Callable[[list[Any]], None]) -> Observer:
        """``Map.observe_deep`` on the map ``name`` (pycrdt events: the Y.Text pieces of
        ``streams``), following the document across rebuilds."""
        return self._observe(Observer(name, callback, deep=True))

    def unobserve(self, observer: Observer) -> None:
        if observer in self._observers:
            self._observers.remove(observer)
            self._unsubscribe(observer)

    def _observe(self, observer: Observer) -> Observer:
        self._observers.append(observer)
        self._subscribe(observer)
        return observer

    def _subscribe(self, observer: Observer) -> None:
        name, callback = observer.name, observer.callback

        def call(event: Any) -> None:
            try:
                callback(event if observer.deep else event.keys)
            except Exception:  # an observer must never break the connection
                self.log.exception("observer of %s failed", name.value)

        mp = self.maps[name]
        observer.subscription = (
            mp.observe_deep(call) if observer.deep else mp.integrated.observe(call)
        )

    def _unsubscribe(self, observer: Observer) -> None:
        if observer.subscription is not None:
            if observer.deep:
                self.maps[observer.name].unobserve(observer.subscription)
            else:
                observer.subscription.drop()
            observer.subscription = None

    def _bind_maps(self) -> None:
        for m in (*KANBAN, MapName.STREAMS):
            self.maps[m] = self.doc.get(m.value, type=Map)

    # ---------------------------------------------------------------- compaction
    @property
    def compact_every(self) -> int:
        """Tasks gone from ``done`` between two compactions (0: never)."""
        return self._schedule.every

    @compact_every.setter
    def compact_every(self, every: int) -> None:
        self._schedule.every = every

    def _on_done_keys(self, changes: KeyChanges) -> None:
        left = sum(1 for c in changes.values() if c.get("action") == "delete")
        # A document used outside a loop has nothing to schedule.
        with contextlib.suppress(RuntimeError):
            self._schedule.task_left(left)

    async def _pass(self) -> bool:
        await self.compact()
        return bool(self._dead)

    def _stop_compacting(self) -> None:
        self._schedule.cancel()

    async def compact(self) -> None:
        """Replace the document by one without the history of finished tasks, as the
        market does with its rooms (igora.market.compaction): the rewrite runs in a thread
        on a snapshot; what arrived meanwhile is applied to the new document, which is
        swapped in, with every observer moved to it, with no await in between. The state
        vector is unchanged (collected items become GC ranges of the same clocks): the
        session with the market goes on as before, nothing is sent."""
        doc = self.doc
        started = time.monotonic()
        try:
            fresh, result, size = await compact_doc(doc, self._dead)
        except Exception:
            self.log.exception(
                "%s: compacting the document failed; not compacted again (please report this)",
                self.name,
            )
            self._schedule.stop()
            self._dead = set()
            return
        if self.doc is not doc:
            return
        self._swap(fresh)
        del doc, fresh
        release_memory()
        self._dead = result.dead
        self.compactions += 1
        self.collected += result.tasks
        # Debug level: every agent of a process tree compacts after each quiet spell, and
        # the market already logs each compaction of the room at info level.
        self.log.debug(
            "%s: document compacted, %d -> %d bytes: the history of %d finished task(s) "
            "collected in %.0f ms",
            self.name,
            size,
            len(result.update),
            result.tasks,
            (time.monotonic() - started) * 1000,
        )

    def _swap(self, fresh: Doc[Any]) -> None:
        """Move to ``fresh``: nothing of the old document is used after this (pycrdt
        objects of a dropped document must not be touched, and nothing keeps it alive)."""
        for observer in self._observers:
            self._unsubscribe(observer)
        self.doc.unobserve(self._doc_subscription)
        self.doc = fresh
        self._bind_maps()
        self._doc_subscription = fresh.observe(self._on_doc_update)
        for observer in self._observers:
            self._subscribe(observer)


class RoomMaps:
    """The room's maps as attributes of a role (``self.todos``, ...), looked up at each
    use: the agent replaces its document when it compacts it, and a Map of the old one
    must never be touched again."""

    agent: Replica

    @property
    def todos(self) -> Map[Any]:
        return self.agent.maps[MapName.TODOS]

    @property
    def prepared(self) -> Map[Any]:
        return self.agent.maps[MapName.PREPARED]

    @property
    def doing(self) -> Map[Any]:
        return self.agent.maps[MapName.DOING]

    @property
    def done(self) -> Map[Any]:
        return self.agent.maps[MapName.DONE]

    @property
    def streams(self) -> Map[Any]:
        return self.agent.maps[MapName.STREAMS]
