"""A room of protocol 3: owned documents kept as update logs, and who reads which.

The room holds each document's log (``doclog.DocLog``), the subscriptions of its
connections (by name, and by prefix for brokers), the identities connected and, per
identity, how many task documents it owns. It does not check who may write or read:
the connection does (``connection``, with ``igora.v3.documents``), before it calls
``write`` or ``subscribe``. What it checks is what needs the room's state: a document's
size and an identity's count of task documents (protocol-v3.md §4, rule 3).

Shared with other replicas (``link``, ``replicas.V3Link``), what its connections write,
attach and drop is published too, and what the others' connections did comes back
(``apply_remote``, and ``attach`` and ``drop`` with ``remote``); the broker lease is
taken in Redis before the room gives it (``request_lease``, ``lease_taken``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from pycrdt import Doc, Map

from ...v3 import board, wire
from ...v3.board import BOARD, SUMMARY
from ...v3.documents import PREFIXES, TASK_DOCUMENTS, DocName, DocumentError, Owner, parse
from ...v3.signed import SignatureError, plain
from ..compaction import release_memory, tune_allocator
from ..fanout import Outbox
from ..limits import DEFAULT_MAX_IDENTITY_BYTES, DEFAULT_TASK_RETENTION
from ..room import background
from ..store import Store
from .bank import Credits
from .doclog import EMPTY_UPDATE, DocHistory, DocLog, rewritten
from .lease import Lease
from .market_docs import MARKET_DOCS, MarketDocs
from .replicas import V3Link, attach_event, drop_event, replace_event, update_event

if TYPE_CHECKING:
    from ..replicas import Replicas

MAX_TASK_DOCUMENTS = 1_000
"""Live task documents (``p/``, ``r/``) one identity may own at once."""
TASK_RETENTION = DEFAULT_TASK_RETENTION
"""Seconds a task document nobody reads and nobody writes stays before the market drops
it (protocol-v3.md §9): what an owner that never dropped it (it crashed, it restarted)
leaves is not kept, and does not count towards its ``MAX_TASK_DOCUMENTS`` for ever."""
SWEEP_EVERY = 60.0  # seconds between two looks for expired task documents, at most
VIEW_EVERY = 1.0  # seconds a room's view is answered from the same copy (the board's pace)

log = logging.getLogger("igora.market")


class Peer(Protocol):
    """A connection as the room sees it (``connection.V3Connection``)."""

    @property
    def ids(self) -> frozenset[str]: ...

    @property
    def outbox(self) -> Outbox: ...

    subscribed: set[str]  # documents it reads by name (subscribed or attached)
    prefixes: set[str]  # prefixes it reads
    state: dict[str, Any]  # its last PRESENCE state

    def lease_granted(self, epoch: int) -> None: ...

    def lease_held(self, epoch: int, place: int) -> None: ...

    async def close(self, code: int, reason: str) -> None: ...


@dataclass(frozen=True)
class DocLimits:
    """How large documents may grow (the task document's cap is ``--max-message``)."""

    task_document: int
    task_documents: int = MAX_TASK_DOCUMENTS
    retention: float = TASK_RETENTION
    identity_bytes: int = DEFAULT_MAX_IDENTITY_BYTES  # all the documents one identity owns


def _parsed(name: str) -> DocName | None:
    try:
        return parse(name)
    except DocumentError:
        return None


def _task_owner(name: str) -> str | None:
    """The owner of a stored task document, None for any other document."""
    doc = _parsed(name)
    return doc.agent if doc is not None and doc.kind in TASK_DOCUMENTS else None


def _agent_owner(doc: DocName | None) -> str | None:
    """The identity that owns ``doc`` when an agent does (``a/``, ``w/``, ``p/``,
    ``r/``): its bytes count towards that identity's limit; None for the broker's and
    the market's documents."""
    return doc.agent if doc is not None and doc.owner is Owner.AGENT else None


class V3Room:
    """One v3 room in memory."""

    def __init__(
        self,
        name: str,
        store: Store,
        limits: DocLimits,
        market: str = "",
        info: dict[str, Any] | None = None,
        replica: str | None = None,
        bank: Credits | None = None,
    ) -> None:
        """``market``: the market's id, ``info`` the limits it announces (in ``dir``);
        ``replica``: this replica's id when the room is shared (``link``), else None;
        ``bank`` its credits (prices in ``dir``, ``standing``, delivery records)."""
        self.name = name
        self.bank = bank
        prices = bank.prices if bank is not None else None
        self.limits = limits
        self.link: V3Link | None = None  # set while the room is shared with replicas
        self.history = DocHistory(name, store, writing=replica is None)
        self.docs: dict[str, DocLog] = self.history.load()
        self.subs: dict[str, set[Peer]] = {}
        self.prefix_subs: dict[str, set[Peer]] = {p: set() for p in PREFIXES}
        self.connections: set[Peer] = set()
        self.identities: Counter[str] = Counter()  # id -> connections that proved it
        self.task_documents: Counter[str] = Counter()  # id -> task documents it owns
        self.owned: Counter[str] = Counter()  # id -> bytes of the documents it owns
        for name, log in self.docs.items():
            owner = _task_owner(name)
            if owner is not None:
                self.task_documents[owner] += 1
            self._own(name, log)
        self.attachments: dict[str, set[str]] = {}  # id -> documents attached to it (§5)
        self.holders = 0  # connections using the room, including ones still joining
        self.idle_since = time.monotonic()
        self.updates = 0  # taken since the room was loaded
        stored = {n: self.docs[n].state() for n in MARKET_DOCS if n in self.docs}
        self.market_docs = MarketDocs(
            stored, self._market_write, market, info or {}, replica, prices, self._market_replace
        )
        self.lease: Lease[Peer] = Lease(self.market_docs.epoch)  # epochs go on growing
        self.lease_asked: set[Peer] = set()  # asked, answer due (the lease is in Redis)
        self._board: tuple[bytes, dict[str, Any] | None] | None = None  # last read
        self._view: tuple[float, str] | None = None  # (when, JSON): view_text's copy
        tune_allocator()  # merged logs of 128 KiB or more: out of the heap (compaction.py)
        self.expired = 0  # task documents dropped for retention since loaded
        self._sweep: asyncio.TimerHandle | None = None
        with contextlib.suppress(RuntimeError):  # no loop: a room made outside a market
            self._sweep_later()

    # ------------------------------------------------------------------ connections
    def join(self, peer: Peer) -> None:
        """A proved connection joins: it reads at once what was attached to its ids."""
        self.connections.add(peer)
        self.identities.update(peer.ids)
        for i in peer.ids:
            if self.identities[i] == 1:
                self.market_docs.joined(i)
                if self.bank is not None:
                    self.market_docs.standing(i, self.bank.bucket(i))
            for name in sorted(self.attachments.get(i, ())):
                self.subscribe(peer, name)

    def leave(self, peer: Peer) -> Peer | None:
        """A connection is gone; the new lease holder, if the lease moved."""
        self.connections.discard(peer)
        self.identities.subtract(peer.ids)
        for i in peer.ids:
            if self.identities[i] <= 0:
                del self.identities[i]
                self.market_docs.left(i)
        for name in peer.subscribed:
            self._unlist(peer, name)
        peer.subscribed.clear()
        for prefix in peer.prefixes:
            self.prefix_subs[prefix].discard(peer)
        held = self.lease.holder is peer
        self.lease_asked.discard(peer)
        # Shared, the lease goes on through Redis (the link), with the next epoch there.
        holder = self.lease.release(peer, hand_over=self.link is None)
        if held:
            self._broker_changed()
            if self.link is not None:
                self.link.lease_left()
        return holder

    def advert(self, advert: dict[str, Any]) -> None:
        """A worker's checked advert (its connection proved ``advert["id"]``)."""
        self.market_docs.advert(advert)

    def presence(self, peer: Peer) -> None:
        """``peer`` sent a PRESENCE: its state's type and name go to ``who``."""
        for i in peer.ids:
            self.market_docs.presence(i, peer.state)

    # ------------------------------------------------------------------ the lease
    def request_lease(self, peer: Peer) -> bool | None:
        """``peer`` asks for the broker lease (may it? the caller checked): True if it
        holds it now, False if it waits in line; None: the answer comes later (the
        lease of a shared room is taken in Redis, ``lease_taken``, ``lease_refused``)."""
        if self.link is not None:
            if self.lease.holder is peer:
                return True
            if peer not in self.lease.waiting:
                self.lease.waiting.append(peer)
            if self.lease.holder is not None:
                return False
            self.lease_asked.add(peer)
            self.link.want_lease()
            return None
        had = self.lease.holder
        granted = self.lease.request(peer)
        if granted and had is not peer:
            self._broker_changed()
        return granted

    def lease_taken(self, epoch: int) -> Peer | None:
        """This replica took the room's lease at ``epoch``: the first connection in line
        holds it (the new holder, None if nobody waits); the others asking are told."""
        holder = self.lease.give(epoch)
        if holder is not None:
            self.lease_asked.discard(holder)
            self._broker_changed()
            holder.lease_granted(epoch)
        self.lease_refused(epoch)
        return holder

    def lease_refused(self, epoch: int) -> None:
        """The connections waiting for an answer are told the lease is held."""
        for peer in self.lease_asked:
            if peer in self.lease.waiting:
                peer.lease_held(epoch, self.lease.waiting.index(peer) + 1)
        self.lease_asked.clear()

    def _broker_changed(self) -> None:
        holder = self.lease.holder
        self.market_docs.broker(min(holder.ids) if holder else None, self.lease.epoch)

    # ------------------------------------------------------------------ reading
    def subscribe(self, peer: Peer, name: str) -> None:
        """Subscribe ``peer`` to ``name`` (read rules checked by the caller) and send it
        the document's state, if there is one yet."""
        self.subs.setdefault(name, set()).add(peer)
        peer.subscribed.add(name)
        self._send_state(peer, name)

    def subscribe_prefix(self, peer: Peer, prefix: str) -> None:
        """Subscribe ``peer`` to every document under ``prefix`` and send it the state of
        those there are. Updates alone left a broker behind for good: after a market
        restart, what the askers and workers back before it wrote (their step 2, the
        tasks they put meanwhile) went to no reader, and Yjs keeps every later update of
        theirs pending for want of it, so their new tasks waited unseen (a v3 room
        stalled after a restart whenever the broker came back last)."""
        if prefix in peer.prefixes:
            return
        self.prefix_subs[prefix].add(peer)
        peer.prefixes.add(prefix)
        for name in [n for n in self.docs if n.startswith(prefix)]:
            self._send_state(peer, name)

    def _send_state(self, peer: Peer, name: str) -> None:
        """The state of ``name`` to a new reader, if there is one yet."""
        doc = self.docs.get(name)
        if doc is not None and doc.epoch:  # which epoch its state is: a reader that
            peer.outbox.put(_replaced(name, doc.epoch))  # holds another starts afresh
        if doc is not None and not doc.empty:
            state = doc.state()
            peer.outbox.put(wire.encode(wire.Doc(name, wire.Sync.STEP2, state)))
            self._delivered(name, state, [peer])

    def unsubscribe_prefix(self, peer: Peer, prefix: str) -> None:
        if prefix in peer.prefixes:
            peer.prefixes.discard(prefix)
            self.prefix_subs[prefix].discard(peer)

    def unsubscribe(self, peer: Peer, name: str) -> None:
        """``peer`` stops reading ``name``; an attachment of its ids to it ends too."""
        peer.subscribed.discard(name)
        self._unlist(peer, name)
        for i in peer.ids:
            attached = self.attachments.get(i)
            if attached is not None and name in attached:
                attached.discard(name)
                if not attached:
                    del self.attachments[i]

    def _unlist(self, peer: Peer, name: str) -> None:
        readers = self.subs.get(name)
        if readers is not None:
            readers.discard(peer)
            if not readers:
                del self.subs[name]
                doc = self.docs.get(name)
                if doc is not None:
                    doc.idle = time.monotonic()  # its retention starts (task documents)

    def readers(self, name: str) -> set[Peer]:
        """The connections subscribed to ``name``, by name or by prefix."""
        out = set(self.subs.get(name, ()))
        for prefix, peers in self.prefix_subs.items():
            if peers and name.startswith(prefix):
                out |= peers
        return out

    def reads(self, peer: Peer, name: str) -> bool:
        return peer in self.readers(name)

    def attached(self, peer: Peer, name: str) -> bool:
        """Whether the lease holder attached one of ``peer``'s ids to ``name``."""
        return any(name in self.attachments.get(i, ()) for i in peer.ids)

    def attach(self, to: str, names: list[str], remote: bool = False) -> None:
        """Attach identity ``to`` to documents (the lease holder's word, §5): every
        connection of ``to`` reads them from now on, their state sent at once, and so
        will its later connections. ``remote``: another replica's holder attached them."""
        if self.link is not None and not remote:
            self.link.publish(attach_event(to, names))
        attached = self.attachments.setdefault(to, set())
        attached.update(names)
        for peer in self.connections:
            if to in peer.ids:
                for name in names:
                    if name not in peer.subscribed:
                        self.subscribe(peer, name)

    def drop(
        self,
        sender: Peer | None,
        name: str,
        why: str = "dropped by its owner",
        remote: bool = False,
    ) -> None:
        """Remove a document (its owner's word, or its retention ended: ``sender`` None):
        its log, its rows, its subscriptions and attachments; its readers get a
        ``NOTICE`` 410. ``remote``: the owner is connected to another replica."""
        if self.link is not None and not remote:
            self.link.publish(drop_event(name))
        if (dropped := self.docs.pop(name, None)) is not None:
            dropped.disown()
            self.history.drop(name)
            if self.bank is not None and name.startswith("r/"):
                self.bank.dropped(self.name, name)
            owner = _task_owner(name)
            if owner is not None:
                self.task_documents[owner] -= 1
                if self.task_documents[owner] <= 0:
                    del self.task_documents[owner]
        notice = wire.encode(wire.Notice(wire.Code.DROPPED, name, why))
        told = self.readers(name)
        if sender is None:  # the owner too: it stops holding it
            owner = _task_owner(name)
            told |= {p for p in self.connections if owner in p.ids}
        for reader in told:
            if reader is not sender:
                reader.outbox.put(notice)
        for peer in self.subs.pop(name, set()):
            peer.subscribed.discard(name)
        for i in [i for i, docs in self.attachments.items() if name in docs]:
            self.attachments[i].discard(name)
            if not self.attachments[i]:
                del self.attachments[i]

    def replace(
        self, sender: Peer | None, name: str, epoch: int | None = None, remote: bool = False
    ) -> int:
        """A new epoch of long-lived document ``name`` (its owner's word, protocol-v3.md
        §9; ``sender`` None: the market's own ``dir`` or ``who``): its log starts empty
        (the owner's whole new state follows as its first update) and its rows are
        replaced; readers and the owner get a ``NOTICE`` 205 naming the epoch, so that
        they take what follows into a new ``Doc``. Epochs are the market's clock in ms,
        always higher than the last: a market restarted never gives one again.
        ``remote``: another replica replaced it, with ``epoch`` (its owner's new state
        follows on the room's stream)."""
        old = self.docs.get(name)
        if epoch is None:
            epoch = max(int(time.time() * 1000), (old.epoch if old is not None else 0) + 1)
        if self.link is not None and not remote:
            self.link.publish(replace_event(name, epoch))
        if old is not None:
            old.disown()
        doc = self.docs[name] = DocLog(epoch=epoch, collect=True)
        self._own(name, doc)
        doc.stored = 0
        self.history.drop(name)
        notice = _replaced(name, epoch)
        told = self.readers(name) | ({sender} if sender is not None else set())
        for peer in told:
            peer.outbox.put(notice)
        release_memory()  # the old log's pages
        return epoch

    def _market_replace(self, name: str, state: bytes) -> None:
        """The market replaced its ``dir`` or ``who`` with ``state``."""
        self.replace(None, name)
        self._market_write(name, state)

    # ------------------------------------------------------------------ retention
    def _sweep_later(self) -> None:
        wait = min(SWEEP_EVERY, max(self.limits.retention / 4, 0.05))
        self._sweep = asyncio.get_running_loop().call_later(wait, self.expire)

    def expire(self) -> int:
        """Drop the task documents nobody reads and nobody wrote for the retention time;
        how many went."""
        self._sweep_later()
        limit = time.monotonic() - self.limits.retention
        gone = [
            name
            for name, doc in self.docs.items()
            if doc.idle < limit and name[:2] in ("p/", "r/") and not self.subs.get(name)
        ]
        why = f"expired: nobody read or wrote it for {self.limits.retention:g} s"
        for name in gone:
            self.drop(None, name, why)
        if gone:
            self.expired += len(gone)
            log.info("room %s: %d task document(s) expired", self.name, len(gone))
        return len(gone)

    def cancel(self) -> None:
        """Stop the room's timers (it leaves memory)."""
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        self.market_docs.cancel()

    def sync(self, name: str, state_vector: bytes) -> bytes:
        """What a holder of ``state_vector`` lacks of ``name`` (ValueError: not a state
        vector)."""
        doc = self.docs.get(name)
        return (doc or DocLog()).diff(state_vector)

    def vector(self, name: str) -> bytes:
        """The state vector of ``name`` as the market holds it."""
        return (self.docs.get(name) or DocLog()).vector()

    # ------------------------------------------------------------------ writing
    def write(self, sender: Peer, doc: DocName, update: bytes) -> str | None:
        """Append a checked update of ``doc`` (its owner's) and relay it to every reader
        but ``sender``; return why it is refused (a limit, in a few words), if it is."""
        if update == EMPTY_UPDATE:
            return None
        name = doc.name
        log = self.docs.get(name)
        is_task = doc.kind in TASK_DOCUMENTS
        owner = _agent_owner(doc)
        if owner is not None and self.owned[owner] + len(update) > self.limits.identity_bytes:
            return f"over {self.limits.identity_bytes} bytes owned by one identity"
        if log is None:
            if is_task and doc.agent is not None:
                owned, most = self.task_documents[doc.agent], self.limits.task_documents
                if owned >= most:
                    return f"over {most} live task documents"
            log = self.docs[name] = DocLog(collect=not is_task, rewritten=rewritten(name))
            self._own(name, log)
            log.stored = 0
            if is_task and doc.agent is not None:
                self.task_documents[doc.agent] += 1
        if is_task and log.size + len(update) > self.limits.task_document:
            return f"over {self.limits.task_document} bytes"
        self._append(sender, name, log, update)
        return None

    def apply_remote(self, name: str, update: bytes, whole: bool = False) -> None:
        """An update of ``name`` another replica took (checked there), relayed to the
        readers here. ``whole``: the document's state (a room's state, which mostly
        repeats what the log holds): the log is merged at once, so that its size, which
        the limits read, does not count it twice."""
        log = self.docs.get(name)
        if log is None:
            log = self.docs[name] = DocLog()
            self._own(name, log)
            log.stored = 0
            owner = _task_owner(name)
            if owner is not None:
                self.task_documents[owner] += 1
        self._append(None, name, log, update, remote=True)
        if whole:
            log.state()  # merges
        if name in MARKET_DOCS:
            self.market_docs.apply(name, update)

    def _append(
        self, sender: Peer | None, name: str, log: DocLog, update: bytes, remote: bool = False
    ) -> None:
        log.append(update)
        self.updates += 1
        self.history.appended(name, update)
        if self.link is not None and not remote:
            self.link.publish(update_event(name, update))
        message = wire.encode(wire.Doc(name, wire.Sync.UPDATE, update))
        readers = [r for r in self.readers(name) if r is not sender]
        for reader in readers:
            reader.outbox.put(message)
        self._delivered(name, update, readers)

    def _delivered(self, name: str, update: bytes, readers: list[Peer]) -> None:
        """A run document's update queued for others than its owner: the delivery record
        a claim without receipt is settled from (``bank``, credits.md §3)."""
        if self.bank is None or not readers or not name.startswith("r/"):
            return
        owner = name.split("/", 2)[1]
        ids = {i for r in readers for i in r.ids if i != owner}
        if ids:
            self.bank.delivered(self.name, name, update, ids)

    def _own(self, name: str, log: DocLog) -> None:
        """Count ``log`` in its owner's bytes (``owned``) if an agent owns ``name``."""
        owner = _agent_owner(_parsed(name))
        if owner is not None:
            log.own(owner, self.owned)

    def _market_write(self, name: str, update: bytes) -> None:
        """An update of ``dir`` or ``who``, the market's own documents."""
        log = self.docs.get(name)
        if log is None:
            log = self.docs[name] = DocLog(collect=True)
        self._append(None, name, log, update)

    def board(self) -> dict[str, Any] | None:
        """The ``board`` summary its broker wrote last (``igora.v3.board``), or None. The
        market keeps the document as a log: it is read through a ``Doc`` once per change."""
        log = self.docs.get(BOARD)
        if log is None or log.empty:
            return None
        state = log.state()
        if self._board is not None and self._board[0] is state:
            return self._board[1]
        doc: Doc[Any] = Doc()
        doc.apply_update(state)
        try:
            summary = board.read(plain(doc.get(BOARD, type=Map).get(SUMMARY)))
        except SignatureError:  # a NaN or Infinity: not a summary
            summary = None
        self._board = (state, summary)
        return summary

    def view(self) -> dict[str, Any]:
        """The room as the web view and ``igora status`` show it (``GET
        /rooms/ROOM/view``): the market's own documents (``dir``: the broker and the
        workers' adverts; ``who``: every agent present) and the broker's ``board``."""
        return {
            "op": "view",  # the same object answers a CONTROL view (protocol-v3.md §12.8)
            "name": self.name,
            "protocol": 3,
            "market": self.market_docs.market_id,
            "broker": self.market_docs.broker_view(),
            "workers": self.market_docs.workers(),
            "agents": self.market_docs.agents(),
            "board": self.board(),
        }

    def view_text(self) -> str:
        """``view`` as JSON, made at most once every ``VIEW_EVERY`` s: what ``GET
        /rooms/ROOM/view`` and a ``CONTROL view`` answer (security.md §5), so that asking
        in a loop costs the market a copy, not a view each time."""
        now = time.monotonic()
        if self._view is None or now - self._view[0] >= VIEW_EVERY:
            self._view = (now, json.dumps(self.view(), separators=(",", ":")))
        return self._view[1]

    def summary(self, agents: bool = True) -> dict[str, Any]:
        """The room as ``GET /status`` lists it: counts, no content; with ``agents``, the
        agents present (``who``: id, type, name, since)."""
        return {
            "name": self.name,
            "protocol": 3,
            "connections": len(self.connections),
            "identities": len(self.identities),
            **({"agents": self.market_docs.agents()} if agents else {}),
            "documents": len(self.docs) - len(self.docs.keys() & set(MARKET_DOCS)),  # the agents'
            "bytes": self._bytes(),
            "expired": self.expired,
            "updates": self.updates,
            "boardBytes": board_log.size if (board_log := self.docs.get(BOARD)) else 0,
            # Shared, another replica may have granted it since: dir says its epoch.
            "lease": {
                "epoch": max(self.lease.epoch, self.market_docs.epoch_seen()),
                "held": self.lease.holder is not None,
            },
            **({"stored_here": self.link.persister} if self.link is not None else {}),
        }

    def _bytes(self) -> dict[str, int]:
        """Bytes of the logs held, by kind of document (``in``, ``a``, ``p``, ``dir``...)."""
        out: Counter[str] = Counter()
        for name, doc in self.docs.items():
            out[name.partition("/")[0]] += doc.size
        return dict(out)


def _replaced(name: str, epoch: int) -> bytes:
    return wire.encode(wire.Notice(wire.Code.REPLACED, name, f"replaced: epoch {epoch}"))


class V3Rooms:
    """The v3 rooms in memory: loaded from the store when a connection has proved
    itself, dropped from memory ``room_idle`` s after their last connection. With
    ``max_rooms`` in memory, the room idle the longest leaves first."""

    def __init__(
        self,
        store: Store,
        limits: DocLimits,
        room_idle: float,
        max_rooms: int,
        market: str = "",
        info: dict[str, Any] | None = None,
        replicas: Replicas | None = None,
        bank: Credits | None = None,
    ) -> None:
        self.store = store
        self.replicas = replicas
        self.bank = bank
        self.limits = limits
        self.market = market
        self.info = info
        self.room_idle = room_idle
        self.max_rooms = max_rooms
        self.rooms: dict[str, V3Room] = {}

    async def room(self, name: str) -> V3Room | str:
        """The room of that name, loaded if need be; or why it cannot be loaded."""
        room = self.rooms.get(name)
        if room is not None:
            return room
        for _ in range(10):
            if len(self.rooms) < self.max_rooms:
                break
            idle = [r for r in self.rooms.values() if r.holders == 0]
            if not idle:
                return f"{self.max_rooms} rooms in memory already, none idle"
            await self._unload(min(idle, key=lambda r: r.idle_since))
        else:
            return f"{self.max_rooms} rooms in memory already"
        room = self.rooms.get(name)  # loaded by another connection meanwhile
        if room is None:
            replica = self.replicas.id if self.replicas is not None else None
            room = V3Room(name, self.store, self.limits, self.market, self.info, replica, self.bank)
            self.rooms[name] = room
            if self.replicas is not None:
                await self.replicas.join(V3Link(self.replicas, room))
        return room

    def unload_later(self, room: V3Room) -> None:
        room.idle_since = time.monotonic()
        loop = asyncio.get_running_loop()
        loop.call_later(self.room_idle, lambda: background(self._unload_if_idle(room)))

    async def _unload_if_idle(self, room: V3Room) -> None:
        if room.holders or self.rooms.get(room.name) is not room:
            return
        if time.monotonic() - room.idle_since < self.room_idle * 0.99:
            return  # someone came and went since: a later call decides
        await self._unload(room)

    async def _unload(self, room: V3Room) -> None:
        room.market_docs.flush()  # who, emptied by the last departure
        await room.history.flush()
        if room.holders or room.history.pending or self.rooms.get(room.name) is not room:
            return
        del self.rooms[room.name]
        room.cancel()
        if self.replicas is not None:
            await self.replicas.leave(room.name)
        log.debug("room %s: unloaded from memory", room.name)

    def standing_changed(self, accounts: set[str]) -> None:
        """Balances moved: the ``standing`` of the rooms where those identities are."""
        if self.bank is None:
            return
        for room in self.rooms.values():
            for account in accounts & room.identities.keys():
                room.market_docs.standing(account, self.bank.bucket(account))

    def flush_sync(self) -> None:
        for room in self.rooms.values():
            room.market_docs.flush()
            room.history.flush_sync()
