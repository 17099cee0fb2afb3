"""A v3 room shared with the other replicas through Redis (``igora market --secure
--redis URL``; docs/market.md, "v3 rooms across replicas").

The keys, the stream, the snapshot, the persister lease and the liveness are the v2
rooms' (``igora.market.replicas``); an entry of a v3 room is one of the room's *events*:

- ``U``: an update of a document (its name, the update), written by its owner on the
  replica the owner is connected to, or by a replica to ``dir`` and ``who``;
- ``A``: an attachment by the broker lease holder (the identity, the documents);
- ``D``: a document dropped by its owner;
- ``S``: the room's whole state: every document's merged update and the attachments
  (the snapshot, a replica's state once it caught up, or sent again after Redis lost its
  data).

Each is ``kind ‖ parts``, each part a 4-byte big-endian length and its bytes.

The broker lease is one per room across replicas: ``igora:{ROOM}:lease:broker`` names
the replica whose connection holds it (renewed by its liveness thread, as the persister
lease), ``igora:{ROOM}:epoch:broker`` counts the grants; inside that replica the room's
``Lease`` keeps its line as on one market.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import struct
from typing import TYPE_CHECKING, Any

from ..replicas import _DOWN, LEASE_TTL, Link, Replicas, _key
from ..room import background

if TYPE_CHECKING:
    from .room import V3Room

log = logging.getLogger("igora.market.replicas")

LEASE_LOST = 4409
"""Close code of a broker whose replica lost the lease (cut off from Redis too long)."""

# KEYS: lease, epoch counter; ARGV: replica, ttl ms, lowest epoch allowed minus one.
# The lease for this replica (free, or its own already): the new epoch; else 0.
_TAKE = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local epoch = redis.call('INCR', KEYS[2])
local floor = tonumber(ARGV[3])
if epoch <= floor then
  epoch = floor + 1
  redis.call('SET', KEYS[2], epoch)
end
return epoch
"""

_LENGTH = struct.Struct(">I")


class EventError(ValueError):
    """An entry that is no event of a v3 room."""


def _pack(kind: bytes, parts: list[bytes]) -> bytes:
    return kind + b"".join(_LENGTH.pack(len(p)) + p for p in parts)


def _unpack(data: bytes) -> tuple[bytes, list[bytes]]:
    kind, parts, i = data[:1], [], 1
    while i < len(data):
        if i + 4 > len(data):
            raise EventError("a part's length is cut")
        (n,) = _LENGTH.unpack_from(data, i)
        i += 4
        if i + n > len(data):
            raise EventError("a part is cut")
        parts.append(data[i : i + n])
        i += n
    return kind, parts


def update_event(name: str, update: bytes) -> bytes:
    return _pack(b"U", [name.encode(), update])


def attach_event(to: str, names: list[str]) -> bytes:
    return _pack(b"A", [to.encode(), *(n.encode() for n in names)])


def drop_event(name: str) -> bytes:
    return _pack(b"D", [name.encode()])


def replace_event(name: str, epoch: int) -> bytes:
    return _pack(b"R", [name.encode(), str(epoch).encode()])


def state_event(docs: dict[str, bytes], attachments: dict[str, set[str]]) -> bytes:
    table = json.dumps({i: sorted(names) for i, names in attachments.items()}).encode()
    parts = [table]
    for name, state in docs.items():
        parts += [name.encode(), state]
    return _pack(b"S", parts)


def apply_event(room: V3Room, data: bytes) -> None:
    """Apply an event another replica published (EventError: not one)."""
    kind, parts = _unpack(data)
    try:
        if kind == b"U" and len(parts) == 2:
            room.apply_remote(parts[0].decode(), parts[1])
        elif kind == b"A" and len(parts) >= 2:
            room.attach(parts[0].decode(), [p.decode() for p in parts[1:]], remote=True)
        elif kind == b"D" and len(parts) == 1:
            room.drop(None, parts[0].decode(), remote=True)
        elif kind == b"R" and len(parts) == 2:
            room.replace(None, parts[0].decode(), int(parts[1]), remote=True)
        elif kind == b"S" and len(parts) % 2 == 1:
            for i in range(1, len(parts), 2):
                room.apply_remote(parts[i].decode(), parts[i + 1], whole=True)
            table: Any = json.loads(parts[0])
            for to, names in table.items():
                room.attach(to, list(names), remote=True)
        else:
            raise EventError(f"kind {kind!r} with {len(parts)} part(s)")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError, ValueError) as exc:
        raise EventError(str(exc)) from None


class V3Link(Link):
    """A v3 room linked to the other replicas: its events, the broker lease, its
    agents in ``who`` by replica."""

    def __init__(self, owner: Replicas, room: V3Room) -> None:
        super().__init__(owner, room.name)
        self.room = room
        self.broker_lease = _key(room.name, "lease:broker")
        self.broker_epoch = _key(room.name, "epoch:broker")
        self._take = owner.redis.register_script(_TAKE)
        self._taking: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ events
    def publish(self, event: bytes) -> None:
        """An event of this replica's connections (or of its ``dir`` and ``who``)."""
        self.owner.put(("u", self.name, event))

    def attached(self) -> None:
        self.room.link = self

    async def joined(self) -> None:
        """Caught up: remove the agents of replicas no longer alive (from the store or
        the stream), then publish the room as this replica holds it (what it loaded from
        its store reaches the others, and its ``dir`` and ``who`` merge with theirs)."""
        seen = sorted(self.room.market_docs.replicas() - {self.owner.id})
        alive = {self.owner.id}
        for replica in seen:
            if await self.owner.redis.exists(self.owner.alive_key(replica)):
                alive.add(replica)
        removed = self.room.market_docs.prune(lambda r: r in alive)
        if removed:
            log.info("room %s: %d agent(s) of replicas gone removed from who", self.name, removed)
        self.publish(self.state())

    def detached(self) -> None:
        self.room.link = None

    def state(self) -> bytes:
        docs = {name: doc.state() for name, doc in self.room.docs.items() if not doc.empty}
        return state_event(docs, self.room.attachments)

    def apply(self, entries: list[tuple[int, str, bytes]]) -> None:
        for n, origin, data in entries:
            if origin == self.owner.id:
                continue  # applied when its connection sent it
            try:
                apply_event(self.room, data)
            except EventError as exc:
                log.warning("room %s: entry %d from Redis is invalid (%s)", self.name, n, exc)

    def signal(self, kind: bytes, origin: str, body: bytes) -> None:
        if kind == b"l":  # the broker lease is free
            self.want_lease()

    def replicas_seen(self) -> set[str]:
        return self.room.market_docs.replicas() - {self.owner.id}

    def gone(self, replica: str) -> int:
        return self.room.market_docs.prune(lambda r: r != replica)

    def storing(self, writing: bool) -> None:
        self.room.history.writing = writing

    async def store_whole(self) -> None:
        await self.room.history.replace()

    # ------------------------------------------------------------------ broker lease
    def held_leases(self) -> list[str]:
        return [self.broker_lease] if self.broker_lease in self.owner.leases else []

    def want_lease(self) -> None:
        """Connections here wait for the broker lease and none here holds it: try to
        take it (one attempt at a time)."""
        lease = self.room.lease
        if self._taking is None and lease.holder is None and lease.waiting:
            self._taking = asyncio.get_running_loop().create_task(self._take_lease())

    async def _take_lease(self) -> None:
        room = self.room
        floor = max(room.lease.epoch, room.market_docs.epoch_seen())
        try:
            ttl = int(LEASE_TTL * 1000)
            keys = [self.broker_lease, self.broker_epoch]
            epoch = int(await self._take(keys=keys, args=[self.owner.id, ttl, floor]))
        except _DOWN as exc:
            log.warning("room %s: the broker lease cannot be asked (%s)", self.name, exc)
            epoch = 0
        finally:
            self._taking = None
        if epoch:
            self.owner.leases[self.broker_lease] = True
            if room.lease_taken(epoch) is None:  # nobody waits any more
                await self._free()
        else:
            room.lease_refused(floor)

    def lease_left(self) -> None:
        """This replica's holder left: the next one here, or the lease goes free."""
        if self.room.lease.waiting:
            self.want_lease()
        else:
            background(self._free())

    async def _free(self) -> None:
        if self.room.lease.holder is not None:
            return
        await self.owner.release(self.broker_lease)
        self.owner.put(("l", self.name, b""))  # the others' waiting connections may ask
        log.info("room %s: broker lease released (no broker waits here)", self.name)

    async def tick(self) -> None:
        """A lease lost (this replica was cut off longer than its term): its holder here
        is closed; then, connections waiting here try again (a dead holder's lease
        expires)."""
        holder = self.room.lease.holder
        if holder is not None and not self.owner.leases.get(self.broker_lease, False):
            self.owner.leases.pop(self.broker_lease, None)
            self.room.lease.holder = None
            log.warning(
                "room %s: broker lease lost (Redis away too long, or it lost its data)", self.name
            )
            with contextlib.suppress(Exception):
                await holder.close(LEASE_LOST, "broker lease lost by this replica")
        self.want_lease()
