"""``dir``, ``who`` and ``standing``: the documents the market writes itself
(protocol-v3.md §4, §6; credits.md §4).

They are the only documents the market holds as pycrdt ``Doc``s. What changes in them
is applied at once and sent at most once per ``INTERVAL`` (a quiet room sends a change at
once): the update since the last one sent goes through the room like any owner's
update (appended to the document's log, stored, relayed to its readers), so a reader
needs nothing special for them.

- ``who.agents``: id -> ``{"type", "name", "since"}`` of every identity connected
  (``type`` and ``name`` from its last ``PRESENCE`` state, null until it says);
- ``dir.market``: ``key`` (the market's id), ``version`` (3), ``limits``, ``prices``
  (the price rule and the grant, ``igora.credits.pricing.prices``);
  ``dir.broker``: ``id`` and ``epoch`` of the lease holder (only ``epoch``, the last
  one, when nobody holds it: a restarted market grants the next one, so agents that
  accept only a newer epoch than they saw keep working);
  ``dir.workers``: id -> a worker's signed advert as it sent it (``igora.v3.advert``),
  removed when the worker leaves;
- ``standing.askers``: id -> the balance bucket (``igora.broker.standing.bucket``) of
  every identity connected, for the broker's priority; removed when it leaves.

Each deletion (an agent left, an advert removed) leaves a tombstone; past
``REPLACE_AFTER`` of them in one document, the market replaces it as any owner replaces
its long-lived documents (protocol-v3.md §9, ``igora.v3.epochs``): ``replace(name,
state)`` takes the new epoch's whole state to the room.

A room loaded from the store continues the stored history of both: nobody is connected
yet, so every ``who`` entry and advert and the broker's id are removed first
(deletions that reach the readers' copies too).

Shared by replicas (``replica``, docs/market.md "v3 rooms across replicas"), each replica
writes its own part: the ``who`` entries of its connections carry ``replica``, its id; it
applies the others' updates (``apply``); the entries of replicas that are gone are
removed by ``prune``, which replaces the clean-up at load.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from typing import Any

from pycrdt import Doc, Map, merge_updates

from ...protocol import now_ms, number
from ...summary import integer
from ...v3.epochs import REPLACE_AFTER, deleted_by, fresh
from ..fanout import AWARENESS_INTERVAL

INTERVAL = AWARENESS_INTERVAL
"""Seconds between two updates of one of these documents (protocol-v3.md §6): v2's
awareness batching, so that a reader of ``who`` sees a change as soon as a v2 agent sees
an awareness change (issue 19: ≤ 100 ms with 1,000 agents and churn), at most 20 updates
a second to its few readers (1 s made that wait 0.5 s on average)."""
MAX_LABEL = 64  # characters of a type or name shown in who

DIR, WHO, STANDING = "dir", "who", "standing"
MARKET_DOCS = (DIR, WHO, STANDING)


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
        replica: str | None = None,
        prices: dict[str, Any] | None = None,
        replace: Callable[[str, bytes], None] | None = None,
    ) -> None:
        self._emit = emit
        # A shared room's dir and who are merged from every replica's writes: a new
        # epoch made by one replica would part them (protocol-v3.md §9, step 8 note).
        self._replace = replace if replica is None else None
        self.replica = replica
        self._applying = False  # applying another replica's update: not ours to send
        self.market_id = market
        self.docs: dict[str, Doc[Any]] = {name: Doc() for name in MARKET_DOCS}
        for name, doc in self.docs.items():
            if name in stored:
                doc.apply_update(stored[name])
        # Each transaction's own update (a deletion too, which a state vector does not
        # show), merged at the next flush; the items deleted since the epoch began.
        self._pending: dict[str, list[bytes]] = {name: [] for name in MARKET_DOCS}
        self.deleted: dict[str, int] = {name: 0 for name in MARKET_DOCS}
        self.replaced = 0  # epochs started since loaded
        self._subs: dict[str, Any] = {}
        # adverts read from dir.workers (``advert_of``, once per claim), forgotten at
        # any change of dir
        self._adverts: dict[str, dict[str, Any] | None] = {}
        for name in self.docs:
            self._observe(name)
        self._due: asyncio.TimerHandle | asyncio.Handle | None = None
        self._last = 0.0
        # What this replica wrote and owns, written again if a merge lost it (``_restore``):
        # dir.broker, the who entries of the identities connected here, their adverts.
        self._broker: tuple[str | None, int] | None = None
        self._here: dict[str, dict[str, Any]] = {}
        self._adverts_here: dict[str, dict[str, Any]] = {}
        self._deleted: dict[str, set[str]] = {WHO: set(), DIR: set()}  # by another's update
        self._watches: list[Any] = []
        if replica is not None:
            self._watch(WHO, "agents")
            self._watch(DIR, "workers")
        agents, broker = self._map(WHO, "agents"), self._map(DIR, "broker")
        if replica is None:  # shared, the link prunes once it caught up
            for gone in (agents, self._map(DIR, "workers"), self._map(STANDING, "askers")):
                for key in list(gone.keys()):
                    del gone[key]
            if "id" in broker:
                del broker["id"]
        self.epoch = self.epoch_seen()  # the last stored
        info = {"key": market, "version": 3, "limits": limits}
        if prices is not None:
            info["prices"] = prices
        market_map = self._map(DIR, "market")
        if market_map.to_py() != info:
            market_map.clear()
            market_map.update(info)
        self.flush()  # at once: nobody reads yet, but the log starts right

    def _observe(self, name: str) -> None:
        def changed(event: Any) -> None:
            if name == DIR:
                self._adverts.clear()
            if not self._applying:
                self._pending[name].append(event.update)
            self.deleted[name] += deleted_by(event)

        self._subs[name] = self.docs[name].observe(changed)

    def apply(self, name: str, update: bytes) -> None:
        """An update of ``dir`` or ``who`` another replica wrote."""
        self._applying = True
        try:
            self.docs[name].apply_update(update)
        finally:
            self._applying = False
        self._restore(name)

    def _watch(self, doc: str, name: str) -> None:
        """Note the keys of ``doc.name`` that another replica's update deletes."""

        def changed(event: Any) -> None:
            if self._applying:
                deleted = self._deleted[doc]
                deleted.update(k for k, c in event.keys.items() if c.get("action") == "delete")

        self._watches.append(self._map(doc, name).observe(changed))

    def _restore(self, name: str) -> None:
        """Write again what this replica owns that a merge with another's concurrent
        write lost. Yjs keeps one of two concurrent writes of a map key (by client id),
        whatever they mean: a replica freeing the broker lease while another takes it
        with the next epoch could leave the older epoch on every replica; an identity
        joining two replicas at once keeps one replica's ``who`` entry, which that
        replica deletes when the identity leaves it, though it is still connected
        here. A write made after the merge follows both, and every replica ends on it.
        Only the keys the update deleted are looked at: O(the change), not O(agents)."""
        lost, self._deleted[name] = sorted(self._deleted.get(name, ())), set()
        if name == DIR:
            if self._broker is not None and self.epoch_seen() < self._broker[1]:
                self.broker(*self._broker)
            for advert in [self._adverts_here[i] for i in lost if i in self._adverts_here]:
                self.advert(advert)
        elif name == WHO:
            agents = self._map(WHO, "agents")
            for id_ in [i for i in lost if i in self._here]:
                agents[id_] = self._here[id_]
                self._changed()

    def epoch_seen(self) -> int:
        """The broker lease's last epoch ``dir`` shows (0: none)."""
        epoch = number(self._map(DIR, "broker").get("epoch"))
        return int(epoch) if epoch is not None and epoch > 0 else 0

    def _entries(self) -> Iterable[tuple[str, str | None]]:
        for id_, entry in self._map(WHO, "agents").items():
            yield id_, entry.get("replica") if isinstance(entry, dict) else None

    def replicas(self) -> set[str]:
        """The replicas whose agents ``who`` lists."""
        return {r for _, r in self._entries() if r is not None}

    def prune(self, keep: Callable[[str | None], bool]) -> int:
        """Remove the ``who`` entries of the replicas ``keep`` rejects (None: an entry
        of a market that was not shared), the adverts of ids no longer in ``who``, and
        the broker's id if it is gone; how many ``who`` entries were removed."""
        agents, workers = self._map(WHO, "agents"), self._map(DIR, "workers")
        gone = [id_ for id_, replica in self._entries() if not keep(replica)]
        for id_ in gone:
            del agents[id_]
        stale = sorted(set(workers.keys()) - set(agents.keys()))
        for id_ in stale:
            del workers[id_]
        broker = self._map(DIR, "broker")
        if "id" in broker and broker["id"] not in agents:
            del broker["id"]
            stale.append("")
        if gone or stale:
            self._changed()
        return len(gone)

    def _map(self, doc: str, name: str) -> Map[Any]:
        shared: Map[Any] = self.docs[doc].get(name, type=Map)
        return shared

    def agents(self) -> list[dict[str, Any]]:
        """Who is connected, as ``/status`` lists a room's agents."""
        return [{"id": i, **entry} for i, entry in self._map(WHO, "agents").items()]

    def workers(self) -> list[dict[str, Any]]:
        """The workers' adverts in ``dir`` as the web view shows them: what they serve,
        without their keys for encryption and signatures."""
        rows = []
        for id_, advert in self._map(DIR, "workers").items():
            if not isinstance(advert, dict):
                continue
            models = advert.get("models")
            rows.append(
                {
                    "id": id_,
                    "name": _label(advert.get("name")),
                    "engine": _label(advert.get("engine")),
                    "state": _label(advert.get("state")),
                    "slots": integer(advert.get("slots")),
                    "since": integer(advert.get("since")),
                    "models": [
                        {
                            "name": _label(m.get("name")),
                            "contextLength": integer(m.get("contextLength")),
                        }
                        for m in (models if isinstance(models, list) else [])
                        if isinstance(m, dict)
                    ],
                }
            )
        return rows

    def broker_view(self) -> dict[str, Any]:
        """``dir.broker``: ``id`` (None: nobody holds the lease) and ``epoch``."""
        broker = self._map(DIR, "broker")
        id_ = broker.get("id")
        return {"id": id_ if isinstance(id_, str) else None, "epoch": integer(broker.get("epoch"))}

    # ------------------------------------------------------------------ changes
    def _mine(self) -> dict[str, str]:
        return {} if self.replica is None else {"replica": self.replica}

    def joined(self, id_: str) -> None:
        entry = {"type": None, "name": None, "since": now_ms(), **self._mine()}
        self._map(WHO, "agents")[id_] = entry
        self._own(self._here, id_, entry)
        self._changed()

    def _own(self, mine: dict[str, dict[str, Any]], id_: str, value: dict[str, Any]) -> None:
        """Note ``value`` as written here for ``id_`` (shared rooms: ``_restore``)."""
        if self.replica is not None:
            mine[id_] = value

    def left(self, id_: str) -> None:
        self._here.pop(id_, None)
        self._adverts_here.pop(id_, None)
        entry = self._map(WHO, "agents").get(id_)
        if isinstance(entry, dict) and entry.get("replica", self.replica) != self.replica:
            return  # connected to another replica since: that one's entry now
        gone = (self._map(WHO, "agents"), self._map(DIR, "workers"), self._map(STANDING, "askers"))
        for entries in gone:
            if id_ in entries:
                del entries[id_]
                self._changed()

    def standing(self, id_: str, bucket: int) -> None:
        """The balance bucket of a connected identity (credits.md §4)."""
        askers = self._map(STANDING, "askers")
        if askers.get(id_) != bucket:
            askers[id_] = bucket
            self._changed()

    def advert(self, advert: dict[str, Any]) -> None:
        """A worker's checked advert, as it sent it."""
        self._map(DIR, "workers")[advert["id"]] = advert
        self._own(self._adverts_here, advert["id"], advert)
        self._changed()

    def advert_of(self, id_: str) -> dict[str, Any] | None:
        """The advert of a worker connected now, as it sent it (never to be changed: it
        is kept until ``dir`` changes)."""
        if id_ not in self._adverts:
            advert = self._map(DIR, "workers").get(id_)
            self._adverts[id_] = advert if isinstance(advert, dict) else None
        return self._adverts[id_]

    def presence(self, id_: str, state: dict[str, Any]) -> None:
        """An agent's PRESENCE state: its ``type`` and ``name`` go to ``who``."""
        agents = self._map(WHO, "agents")
        entry = agents.get(id_)
        if not isinstance(entry, dict):
            return
        shown = {"type": _label(state.get("type")), "name": _label(state.get("name"))}
        shown.update(self._mine())
        if {k: entry.get(k) for k in shown} != shown:
            agents[id_] = entry = {**entry, **shown}
            if id_ in self._here:
                self._here[id_] = entry
            self._changed()

    def broker(self, id_: str | None, epoch: int) -> None:
        """The lease holder (None: nobody holds the lease)."""
        self._broker = (id_, epoch)
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
