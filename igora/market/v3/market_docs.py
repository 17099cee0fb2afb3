"""``dir`` and ``who``: the two documents the market writes itself (protocol-v3.md §4, §6).

They are the only documents the market holds as pycrdt ``Doc``s. What changes in them
is applied at once and sent at most once per ``INTERVAL`` (a quiet room sends a change at
once): the update since the last one sent goes through the room like any owner's
update (appended to the document's log, stored, relayed to its readers), so a reader
needs nothing special for them.

- ``who.agents``: id -> ``{"type", "name", "since"}`` of every identity connected
  (``type`` and ``name`` from its last ``PRESENCE`` state, null until it says);
- ``dir.market``: ``key`` (the market's id), ``version`` (3), ``limits``;
  ``dir.broker``: ``id`` and ``epoch`` of the lease holder (only ``epoch``, the last
  one, when nobody holds it: a restarted market grants the next one, so agents that
  accept only a newer epoch than they saw keep working);
  ``dir.workers``: id -> a worker's signed advert as it sent it (``igora.v3.advert``),
  removed when the worker leaves.

Each deletion (an agent left, an advert removed) leaves a tombstone; past
``REPLACE_AFTER`` of them in one document, the market replaces it as any owner replaces
its long-lived documents (protocol-v3.md §9, ``igora.v3.epochs``): ``replace(name,
state)`` takes the new epoch's whole state to the room.

A room loaded from the store continues the stored history of both: nobody is connected
yet, so every ``who`` entry and advert and the broker's id are removed first
(deletions that reach the readers' copies too).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from pycrdt import Doc, Map, merge_updates

from ...protocol import now_ms, number
from ...v3.epochs import REPLACE_AFTER, deletions, fresh
from ..fanout import AWARENESS_INTERVAL

INTERVAL = AWARENESS_INTERVAL
"""Seconds between two updates of one of these documents (protocol-v3.md §6): v2's
awareness batching, so that a reader of ``who`` sees a change as soon as a v2 agent sees
an awareness change (issue 19: ≤ 100 ms with 1,000 agents and churn), at most 20 updates
a second to its few readers (1 s made that wait 0.5 s on average)."""
MAX_LABEL = 64  # characters of a type or name shown in who

DIR, WHO = "dir", "who"


def _label(value: Any) -> str | None:
    return value[:MAX_LABEL] if isinstance(value, str) else None


class MarketDocs:
    """The market's ``dir`` and ``who`` of one room; ``emit(name, update)`` takes an
    update of one of them to the room."""

    def __init__(
        self,
        stored: dict[str, bytes],
        emit: Callable[[str, bytes], None],
        market: str,
        limits: dict[str, Any],
        replace: Callable[[str, bytes], None] | None = None,
    ) -> None:
        self._emit = emit
        self._replace = replace
        self.docs: dict[str, Doc[Any]] = {DIR: Doc(), WHO: Doc()}
        for name, doc in self.docs.items():
            if name in stored:
                doc.apply_update(stored[name])
        # Each transaction's own update (a deletion too, which a state vector does not
        # show), merged at the next flush; the items deleted since the epoch began.
        self._pending: dict[str, list[bytes]] = {DIR: [], WHO: []}
        self.deleted: dict[str, int] = {DIR: 0, WHO: 0}
        self.replaced = 0  # epochs started since loaded
        for name in self.docs:
            self._observe(name)
        self._due: asyncio.TimerHandle | asyncio.Handle | None = None
        self._last = 0.0
        agents, broker = self._map(WHO, "agents"), self._map(DIR, "broker")
        for gone in (agents, self._map(DIR, "workers")):
            for key in list(gone.keys()):
                del gone[key]
        epoch = number(broker.get("epoch"))
        self.epoch = int(epoch) if epoch is not None and epoch > 0 else 0  # the last stored
        if "id" in broker:
            del broker["id"]
        info = {"key": market, "version": 3, "limits": limits}
        market_map = self._map(DIR, "market")
        if market_map.to_py() != info:
            market_map.clear()
            market_map.update(info)
        self.flush()  # at once: nobody reads yet, but the log starts right

    def _observe(self, name: str) -> None:
        def changed(event: Any) -> None:
            self._pending[name].append(event.update)
            self.deleted[name] += deletions(event.delete_set)

        self.docs[name].observe(changed)

    def _map(self, doc: str, name: str) -> Map[Any]:
        shared: Map[Any] = self.docs[doc].get(name, type=Map)
        return shared

    def agents(self) -> list[dict[str, Any]]:
        """Who is connected, as ``/status`` lists a room's agents."""
        return [{"id": i, **entry} for i, entry in self._map(WHO, "agents").items()]

    # ------------------------------------------------------------------ changes
    def joined(self, id_: str) -> None:
        self._map(WHO, "agents")[id_] = {"type": None, "name": None, "since": now_ms()}
        self._changed()

    def left(self, id_: str) -> None:
        for entries in (self._map(WHO, "agents"), self._map(DIR, "workers")):
            if id_ in entries:
                del entries[id_]
                self._changed()

    def advert(self, advert: dict[str, Any]) -> None:
        """A worker's checked advert, as it sent it."""
        self._map(DIR, "workers")[advert["id"]] = advert
        self._changed()

    def presence(self, id_: str, state: dict[str, Any]) -> None:
        """An agent's PRESENCE state: its ``type`` and ``name`` go to ``who``."""
        agents = self._map(WHO, "agents")
        entry = agents.get(id_)
        if not isinstance(entry, dict):
            return
        shown = {"type": _label(state.get("type")), "name": _label(state.get("name"))}
        if {k: entry.get(k) for k in shown} != shown:
            agents[id_] = {**entry, **shown}
            self._changed()

    def broker(self, id_: str | None, epoch: int) -> None:
        """The lease holder (None: nobody holds the lease)."""
        broker = self._map(DIR, "broker")
        if id_ is None:
            if "id" in broker:
                del broker["id"]
        else:
            broker["id"] = id_
        broker["epoch"] = epoch
        self._changed()

    # ------------------------------------------------------------------ sending
    def _changed(self) -> None:
        if self._due is not None:
            return
        loop = asyncio.get_running_loop()
        wait = self._last + INTERVAL - loop.time()
        self._due = loop.call_later(wait, self.flush) if wait > 0 else loop.call_soon(self.flush)

    def flush(self) -> None:
        """Send what changed since the last update sent."""
        if self._due is not None:
            self._due.cancel()
            self._due = None
        with contextlib.suppress(RuntimeError):  # no loop: at shutdown
            self._last = asyncio.get_running_loop().time()
        for name, updates in self._pending.items():
            if updates:
                self._pending[name] = []
                self._emit(name, merge_updates(*updates) if len(updates) > 1 else updates[0])
            if self.deleted[name] >= REPLACE_AFTER and self._replace is not None:
                self._new_epoch(name)

    def _new_epoch(self, name: str) -> None:
        """Replace ``name`` by its live entries (its tombstones go)."""
        self.docs[name] = fresh(self.docs[name])
        self.deleted[name] = 0
        self._observe(name)
        self.replaced += 1
        assert self._replace is not None
        self._replace(name, self.docs[name].get_update())

    def cancel(self) -> None:
        if self._due is not None:
            self._due.cancel()
            self._due = None
