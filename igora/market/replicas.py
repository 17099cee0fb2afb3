"""Replicas: several market processes serving the same rooms through Redis.

``igora market --redis URL`` makes this process one replica among any number. What one
replica accepts from its own connections (after every check: ``frames``, the causal gate,
the limits) goes to Redis; what the others accepted comes back from it. Per room (a v2
room is one document, docs/market.md "Replicas through Redis"; a v3 room's entries are
its events, ``v3.replicas``: the ``Link`` of a room says what its entries are):

- ``igora:{ROOM}:d``, a stream: every update, with its sequence number ``n`` (from the
  counter ``igora:{ROOM}:n``), the replica that sent it ``r`` and the update ``u``; one
  script appends it and publishes it, so its number, its place in the stream and its
  message agree;
- ``igora:{ROOM}:c``, a pub/sub channel: the updates as they are appended, awareness
  updates (not stored), and the queries of a replica that joins the room;
- ``igora:{ROOM}:s``, the snapshot (a hash: ``doc``, ``n``, ``id``): the room's state up
  to stream entry ``id``, written by the replica that persists the room, which then
  trims the stream before it;
- ``igora:{ROOM}:lease:store``, the persister lease: the one replica that writes the
  room to the store (``SET NX PX`` + a renewal that extends it only for its holder);
- ``igora:replica:ID``, each replica's liveness key: when one expires, the others remove
  the awareness states of the agents that were connected to it;
- ``igora:epoch``, a token set once: a new token means Redis lost its data (restarted
  without persistence), and every replica sends its whole state again.

A replica applies an update numbered ``n`` at once when it follows the last it saw;
otherwise it reads the gap with ``XRANGE`` (and the snapshot, if the stream was trimmed
past it). While Redis is unreachable the replica serves its own connections, keeps what
it must publish in order, and sends it (or, if Redis lost its data, its whole state)
once Redis is back.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import secrets
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from pycrdt import merge_updates, read_message
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError

from ..aio import within
from ..updates import Parsed, UpdateError, check_update, is_panic
from .frames import BadFrame, awareness_presence

if TYPE_CHECKING:
    from .room import MarketRoom

log = logging.getLogger("igora.market.replicas")

LEASE_TTL = 10.0
"""Seconds a lease (persister of a room, a replica's liveness) lasts unless renewed."""
TICK = 3.0
"""Seconds between two renewals of the leases and liveness checks."""
SNAPSHOT_AFTER = 1_000
"""Stream entries after which the persister writes a snapshot and trims the stream."""
GAP_PAGE = 500
"""Entries read per XRANGE while filling a gap."""
MAX_BUFFERED = 100_000
"""Items kept for Redis while it is unreachable; past it, the rooms' whole states are
sent on recovery instead (they hold every update of the buffer)."""
RECONNECT_MAX = 5.0
BATCH_MAX = 1_000
"""Messages from Redis handled as one batch, at most (those already arrived)."""

# KEYS: stream, counter, channel; ARGV: replica id, update. Returns the number.
_APPEND = """
local n = redis.call('INCR', KEYS[2])
local id = redis.call('XADD', KEYS[1], '*', 'n', n, 'r', ARGV[1], 'u', ARGV[2])
redis.call('PUBLISH', KEYS[3], 'u ' .. n .. ' ' .. id .. ' ' .. ARGV[1] .. ' ' .. ARGV[2])
return n
"""
# KEYS: lease; ARGV: holder, ttl ms. 1 if renewed (still the holder's), else 0.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_DOWN = (RedisError, OSError, asyncio.TimeoutError)


class Liveness(threading.Thread):
    """Renews this replica's liveness key and the leases it holds every ``TICK`` s, from a
    thread of its own with its own connection: a replica whose event loop is saturated
    (thousands of agents on a busy machine) is slow, not dead, and must neither have its
    agents removed by the others nor lose its leases. A process that dies stops
    renewing: its keys expire within ``LEASE_TTL`` s."""

    def __init__(self, url: str, replica: str, key: str) -> None:
        super().__init__(name="igora-replica-liveness", daemon=True)
        self.replica = replica
        self.key = key
        self.value = f"{socket.gethostname()} {os.getpid()}"
        self.client = SyncRedis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        self._renew = self.client.register_script(_RENEW)
        self.leases: dict[str, bool] = {}  # lease key -> still held (False: lost)
        self.stopping = threading.Event()

    def renew(self) -> None:
        ttl = int(LEASE_TTL * 1000)
        self.client.set(self.key, self.value, px=ttl)
        for lease in list(self.leases):
            if not self._renew(keys=[lease], args=[self.replica, ttl]) and lease in self.leases:
                self.leases[lease] = False

    def run(self) -> None:
        while not self.stopping.wait(TICK):
            with contextlib.suppress(*_DOWN):  # the event loop notices and logs it
                self.renew()

    def stop(self) -> None:
        self.stopping.set()
        with contextlib.suppress(*_DOWN):
            self.client.delete(self.key)
        self.client.close()


class RedisUnreachable(OSError):
    """Redis does not answer at start (a one-line error of ``igora market``)."""


def _key(room: str, what: str) -> str:
    # The braces keep a room's keys in one slot of a Redis cluster (its hash tag).
    return f"igora:{{{room}}}:{what}"


async def check_redis(url: str, timeout: float = 5.0) -> None:
    """Raise RedisUnreachable, in one line, unless Redis answers at ``url``."""
    try:
        client: Redis = Redis.from_url(url, socket_connect_timeout=timeout)
    except ValueError as exc:
        raise RedisUnreachable(f"--redis {url!r} is not a Redis URL ({exc})") from None
    try:
        await within(client.ping(), timeout)
    except (*_DOWN, ValueError) as exc:
        raise RedisUnreachable(
            f"Redis at {url} does not answer ({exc or type(exc).__name__}): "
            "is redis-server running?"
        ) from None
    finally:
        await client.aclose()


class Link:
    """One room as seen from Redis: where this replica is in its stream, whether this
    replica persists it. What an entry means, and what the room's state is, depends on
    the room's protocol: ``RoomLink`` (v2, one document) and ``v3.replicas.V3Link`` (v3,
    the room's documents and their events) say it; the rest is this module's."""

    def __init__(self, owner: Replicas, name: str) -> None:
        self.owner = owner
        self.name = name
        self.stream, self.counter = _key(name, "d"), _key(name, "n")
        self.channel, self.snapshot = _key(name, "c"), _key(name, "s")
        self.lease = _key(name, "lease:store")
        self.last_n = 0  # number of the last stream entry applied (or skipped: our own)
        self.last_id = b""  # its stream id
        self.persister = False
        self.since_snapshot = 0
        self.catching: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()  # Redis confirmed the subscription to its channel
        self.again = False  # a gap was seen while filling another
        self.stuck_at: int | None = None  # last_n at the last check that found it behind

    def start_over(self) -> None:
        """Redis lost the room (a restart): read its stream from its start."""
        self.last_n, self.last_id, self.since_snapshot = 0, b"", 0

    # What each kind of room says.
    def attached(self) -> None:
        """The room is linked (before its catch-up)."""

    async def joined(self) -> None:
        """The room caught up with Redis."""

    def detached(self) -> None:
        """The room left this replica's links."""

    def state(self) -> bytes:
        """The room's whole state, as one entry (a snapshot, or sent again to a Redis
        that lost its data)."""
        raise NotImplementedError

    def snapshot_ready(self) -> bool:
        """Whether ``state`` holds every entry applied so far."""
        return True

    def apply(self, entries: list[tuple[int, str, bytes]]) -> None:
        """Apply consecutive stream entries ``(n, replica, payload)`` (a snapshot's state
        with replica ``""``); this replica's own are among them (applied already)."""
        raise NotImplementedError

    def signal(self, kind: bytes, origin: str, body: bytes) -> None:
        """A message of the room's channel that is not an entry, from another replica."""

    def replicas_seen(self) -> set[str]:
        """The other replicas this room holds something of (agents), to check alive."""
        return set()

    def gone(self, replica: str) -> int:
        """``replica`` is dead: remove what this room holds of it; how many agents."""
        return 0

    def storing(self, writing: bool) -> None:
        """This replica starts (True) or stops writing the room to its store."""

    async def store_whole(self) -> None:
        """Write the room whole to the store (on taking its persister lease)."""

    async def tick(self) -> None:
        """Every ``TICK`` s while Redis answers (the room's own leases)."""

    def held_leases(self) -> list[str]:
        """Lease keys this room holds for this replica besides the persister's."""
        return []


class RoomLink(Link):
    """A v2 room (one document) linked to the others: its updates, its awareness, and
    who speaks for the remote awareness states."""

    def __init__(self, owner: Replicas, room: MarketRoom) -> None:
        super().__init__(owner, room.name)
        self.room = room
        self.remote: dict[int, str] = {}  # awareness client id -> replica holding it

    def attached(self) -> None:
        self.room.link = self

    async def joined(self) -> None:
        await self.owner.redis.publish(self.channel, b"q " + self.owner.id.encode())

    def detached(self) -> None:
        self.room.link = None

    def publish_update(self, update: bytes) -> None:
        """An update this replica applied from one of its connections."""
        self.owner.put(("u", self.room.name, update))

    def publish_awareness(self, message: bytes) -> None:
        """An awareness message from this replica's connections (batched by the room's
        relay, as for its own connections), or its removal of their states."""
        self.owner.put(("a", self.room.name, message))

    put = publish_awareness

    @property
    def outbox(self) -> RoomLink:
        """The room's awareness relay sees the other replicas as one more receiver."""
        return self

    def reload(self) -> None:
        """The room rebuilt its document from the store, which may lag behind Redis:
        read the room from Redis again (its snapshot and stream)."""
        self.start_over()
        self.owner.gap(self)

    def state(self) -> bytes:
        return self.room.ydoc.get_update()

    def snapshot_ready(self) -> bool:
        return not self.room.gate.waiting

    def storing(self, writing: bool) -> None:
        self.room.history.writing = writing

    async def store_whole(self) -> None:
        await self.room.history.replace()  # the whole state: what the last holder missed

    def apply(self, entries: list[tuple[int, str, bytes]]) -> None:
        """Apply consecutive stream entries (except this replica's own: applied already)
        as one update: one transaction, one frame to each connection here, instead of
        one per entry. Should the merged update be refused, each is applied alone (and
        refused alone, if it is)."""
        valid: list[tuple[int, bytes, Parsed]] = []
        for n, origin, update in entries:
            if origin != self.owner.id and (parsed := self._checked(n, update)) is not None:
                valid.append((n, update, parsed))
        if len(valid) > 1:
            try:
                merged = merge_updates(*(update for _, update, _ in valid))
                refusal = self.room.receive(None, merged, check_update(merged))
            except Exception as exc:
                refusal = f"{type(exc).__name__}: {exc}"
            except BaseException as exc:
                if not is_panic(exc):
                    raise
                refusal = f"pycrdt panic: {exc}"
            if refusal is None:
                return
            log.info(
                "room %s: updates %d to %d from Redis refused merged (%s); one by one",
                self.name,
                valid[0][0],
                valid[-1][0],
                refusal,
            )
        for n, update, parsed in valid:
            refusal = self.room.receive(None, update, parsed)
            if refusal is not None:
                log.warning("room %s: update %d from Redis refused: %s", self.name, n, refusal)

    def _checked(self, n: int, update: bytes) -> Parsed | None:
        try:
            return check_update(update)
        except UpdateError as exc:
            log.warning("room %s: update %d from Redis is invalid (%s); skipped", self.name, n, exc)
            return None

    # ------------------------------------------------------------------ awareness
    def signal(self, kind: bytes, origin: str, body: bytes) -> None:
        if kind == b"a":
            self._awareness(origin, body)
        elif kind == b"q":
            self._answer_query()

    def _awareness(self, origin: str, message: bytes) -> None:
        room = self.room
        try:
            payload = read_message(message[1:])
            entries = awareness_presence(payload)
        except (BadFrame, ValueError) as exc:
            log.warning(
                "room %s: awareness from replica %s is invalid (%s)", room.name, origin, exc
            )
            return
        for client_id, present in entries:
            if client_id in room.controllers:
                continue  # its agent is here now
            if not present:
                if self.remote.get(client_id) == origin:
                    del self.remote[client_id]
            else:
                self.remote[client_id] = origin
        room.relay_remote_awareness(message, payload)

    def _answer_query(self) -> None:
        """A replica joined the room: tell it the states of the agents connected here."""
        aw = self.room.awareness
        ids = [c for c in self.room.controllers if c in aw.states]
        if ids:
            self.publish_awareness(self.room.encoded_states.message(aw, ids))

    def replicas_seen(self) -> set[str]:
        return set(self.remote.values())

    def gone(self, replica: str) -> int:
        gone = [c for c, r in self.remote.items() if r == replica]
        for c in gone:
            del self.remote[c]
        return self.room.remove_states([c for c in gone if c not in self.room.controllers])


class Replicas:
    """This process's link to the others through Redis (``igora market --redis URL``)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.id = secrets.token_hex(6)
        self.redis: Redis = Redis.from_url(
            url, socket_connect_timeout=2, socket_timeout=5, health_check_interval=10
        )
        self.links: dict[str, Link] = {}
        self.up = False
        self.up_since = 0.0
        self.epoch: bytes | None = None
        self._out: collections.deque[tuple[str, str, bytes]] = collections.deque()
        self._wake = asyncio.Event()
        self._resubscribe = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._overflow = False
        self._coming_back = asyncio.Lock()
        self._liveness = Liveness(url, self.id, self.alive_key(self.id))
        self._append = self.redis.register_script(_APPEND)
        self._release = self.redis.register_script(_RELEASE)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        await self._connected()
        loop = asyncio.get_running_loop()
        for coro in (self._publish_loop(), self._listen_loop(), self._tick_loop()):
            self._tasks.append(loop.create_task(coro))
        self._liveness.start()
        log.info("replica %s: sharing rooms through Redis at %s", self.id, self.url)

    async def stop(self) -> None:
        """Publish what is left (briefly), release the leases, say this replica is gone."""
        deadline = time.monotonic() + 2.0
        while self._out and self.up and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(*_DOWN):
            for link in self.links.values():
                for lease in [link.lease] if link.persister else []:
                    await self._release(keys=[lease], args=[self.id])
                for lease in link.held_leases():
                    await self.release(lease)
        await asyncio.to_thread(self._liveness.stop)
        with contextlib.suppress(*_DOWN):
            await self.redis.aclose()

    @staticmethod
    def alive_key(replica: str) -> str:
        return f"igora:replica:{replica}"

    async def _connected(self) -> None:
        """Redis answers (again): note its epoch; if it lost its data, every room is
        read again from the start and this replica sends its whole state of each."""
        await asyncio.to_thread(self._liveness.renew)
        await self.redis.set("igora:epoch", secrets.token_hex(8), nx=True)
        epoch: Any = await self.redis.get("igora:epoch")
        if self.epoch is not None and epoch != self.epoch:
            log.warning(
                "replica %s: Redis lost its data (restarted?): sending the whole state "
                "of %d room(s) again",
                self.id,
                len(self.links),
            )
            self._overflow = True  # the publisher sends the rooms' whole states
        self.epoch = epoch
        if self._overflow:
            for link in self.links.values():
                link.start_over()
            self._wake.set()
        if not self.up:
            self.up, self.up_since = True, time.monotonic()

    async def _back(self) -> None:
        """Redis answers again (to the publisher or the listener, whichever first): check
        its epoch, and catch up with every room."""
        async with self._coming_back:
            if self.up:
                return
            await self._connected()
            log.info("replica %s: Redis is back; catching up", self.id)
            for link in list(self.links.values()):
                self.gap(link)

    def _lost(self, exc: BaseException) -> None:
        if self.up:
            log.error(
                "replica %s: Redis lost (%s); serving local agents, keeping %d message(s) for it",
                self.id,
                exc or type(exc).__name__,
                len(self._out),
            )
        self.up = False

    # ------------------------------------------------------------------ rooms
    async def join(self, link: Link) -> None:
        """A room is loaded here: follow its channel and catch up with its stream."""
        self.links[link.name] = link
        link.attached()
        self._resubscribe.set()
        try:
            # Subscribed first, then read: no update falls between the two.
            with contextlib.suppress(asyncio.TimeoutError):
                await within(link.subscribed.wait(), 5.0)
            await self._catch_up(link)
            await link.joined()
        except _DOWN as exc:
            self._lost(exc)
        await self._take_lease(link)

    async def leave(self, name: str) -> None:
        """Room ``name`` leaves memory here: stop following it, let another persist it."""
        link = self.links.pop(name, None)
        if link is None:
            return
        link.detached()
        self._resubscribe.set()
        for lease in [link.lease, *link.held_leases()]:
            await self.release(lease)

    async def release(self, lease: str) -> None:
        """Give up a lease this replica holds (if it still does)."""
        if self._liveness.leases.pop(lease, None) is not None:
            with contextlib.suppress(*_DOWN):
                await self._release(keys=[lease], args=[self.id])

    @property
    def leases(self) -> dict[str, bool]:
        """The leases this replica holds, renewed by its liveness thread: key -> still
        held (False once a renewal found it gone)."""
        return self._liveness.leases

    def put(self, item: tuple[str, str, bytes]) -> None:
        """Queue an update or awareness message for Redis, in order. Past
        ``MAX_BUFFERED`` (Redis away for long), updates are dropped from the queue: the
        rooms' whole states, sent once Redis is back, hold them."""
        if not self._overflow and len(self._out) >= MAX_BUFFERED:
            log.error(
                "replica %s: %d messages wait for Redis; the rooms' whole states will be "
                "sent instead",
                self.id,
                MAX_BUFFERED,
            )
            self._overflow = True
        if self._overflow and item[0] == "u":
            return
        self._out.append(item)
        self._wake.set()

    def _resend_states(self) -> None:
        """Replace the queued updates by each room's whole state (taken here, outside
        any transaction of the documents); awareness messages stay, in order."""
        self._overflow = False
        kept = [item for item in self._out if item[0] != "u"]
        self._out.clear()
        for name, link in self.links.items():
            self._out.append(("u", name, link.state()))
        self._out.extend(kept)

    # ------------------------------------------------------------------ publishing
    async def _publish_loop(self) -> None:
        delay = 0.1
        while True:
            if self._overflow and self.up:
                self._resend_states()
            if not self._out:
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = list(self._out)[:256]
            try:
                # EVALSHA itself: a Script in a pipeline asks SCRIPT EXISTS first, one
                # more round trip per batch.
                async with self.redis.pipeline(transaction=False) as pipe:
                    for kind, name, data in batch:
                        if kind == "u":
                            keys = (_key(name, "d"), _key(name, "n"), _key(name, "c"))
                            pipe.evalsha(self._append.sha, 3, *keys, self.id, data)
                        else:
                            message = f"{kind} {self.id} ".encode() + data
                            pipe.publish(_key(name, "c"), message)
                    await pipe.execute()
            except NoScriptError:  # a restarted Redis: its script cache is empty
                with contextlib.suppress(*_DOWN):
                    await self.redis.script_load(_APPEND)
                continue
            except _DOWN as exc:
                self._lost(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX)
                continue
            delay = 0.1
            with contextlib.suppress(*_DOWN):  # the listener, or the next batch, retries
                await self._back()  # this connection alone failed: up again all the same
            for item in batch:  # the queue may have been replaced meanwhile
                if not self._out or self._out[0] is not item:
                    break
                self._out.popleft()

    # ------------------------------------------------------------------ receiving
    async def _listen_loop(self) -> None:
        delay = 0.1
        while True:
            pubsub = self.redis.pubsub()
            try:
                channels = self._channels()
                await pubsub.subscribe(*channels)
                await self._back()
                delay = 0.1
                while True:
                    if self._resubscribe.is_set():
                        self._resubscribe.clear()
                        now = self._channels()
                        if now - channels:
                            await pubsub.subscribe(*(now - channels))
                        if channels - now:
                            await pubsub.unsubscribe(*(channels - now))
                        channels = now
                    message = await pubsub.get_message(timeout=0.2)
                    if message is None:
                        continue
                    # What else has arrived already, handled as one batch.
                    batch = [message]
                    while len(batch) < BATCH_MAX:
                        more = await pubsub.get_message(timeout=0.0)
                        if more is None:
                            break
                        batch.append(more)
                    self._received_batch(batch)
            except asyncio.CancelledError:
                raise
            except _DOWN as exc:
                self._lost(exc)
            except Exception:
                log.exception("replica %s: listening to Redis failed", self.id)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX)

    def _channels(self) -> set[str]:
        return {"igora:replicas"} | {link.channel for link in self.links.values()}

    def _subscribed(self, channel: bytes) -> None:
        for link in self.links.values():
            if link.channel.encode() == channel:
                link.subscribed.set()

    def _received_batch(self, batch: list[dict[str, Any]]) -> None:
        """Handle what Redis sent, in order; each run of consecutive stream entries of a
        room is applied as one (``Link.apply``)."""
        run: list[tuple[int, str, bytes]] = []
        run_link: Link | None = None
        for message in batch:
            kind = message.get("type")
            if kind == "subscribe":
                self._subscribed(message["channel"])
            if kind != "message":
                continue
            try:
                link, entry = self._received(message["channel"], message["data"])
            except ValueError as exc:  # not from a replica of this version
                log.warning("replica %s: bad message from Redis (%s)", self.id, exc)
                continue
            if run and (entry is None or link is not run_link):
                assert run_link is not None
                run_link.apply(run)
                run = []
            if entry is not None:
                run_link = link
                run.append(entry)
        if run:
            assert run_link is not None
            run_link.apply(run)

    def _received(
        self, channel: bytes, data: bytes
    ) -> tuple[Link | None, tuple[int, str, bytes] | None]:
        """Handle one message from a room's channel; a stream entry to apply next is
        returned instead, with its room (applied by the caller with the entries after it).
        Other messages are ``KIND ORIGIN[ BODY]``, for the room's link."""
        name = channel.decode()[len("igora:{") : -len("}:c")]
        link = self.links.get(name)
        if link is None or not data:
            return link, None
        if data[:2] == b"u ":
            n_raw, sid, origin, update = data[2:].split(b" ", 3)
            n = int(n_raw)
            if n <= link.last_n:
                return link, None
            if n != link.last_n + 1 or link.catching is not None:
                self.gap(link)
                return link, None
            link.last_n, link.last_id = n, sid  # applied with the rest of its run
            link.since_snapshot += 1
            return link, (n, origin.decode(), update)
        kind, _, rest = data.partition(b" ")
        origin, _, body = rest.partition(b" ")
        if origin.decode() != self.id:
            link.signal(kind, origin.decode(), body)
        return link, None

    def _entry(self, link: Link, n: int, sid: bytes, origin: str, update: bytes) -> None:
        """Apply stream entry ``n`` (unless this replica sent it: applied already)."""
        link.last_n, link.last_id = n, sid
        link.since_snapshot += 1
        link.apply([(n, origin, update)])

    def gap(self, link: Link) -> None:
        if link.catching is not None:
            link.again = True
            return
        link.catching = asyncio.get_running_loop().create_task(self._fill(link))

    async def _fill(self, link: Link) -> None:
        try:
            while True:
                link.again = False
                await self._catch_up(link)
                if not link.again:
                    break
        except _DOWN as exc:
            self._lost(exc)  # the listener catches up again when Redis is back
        finally:
            link.catching = None

    async def _catch_up(self, link: Link) -> None:
        """Apply every stream entry after the last one seen; from the snapshot first if
        the stream was trimmed past it."""
        first = True
        while True:
            start = b"(" + link.last_id if link.last_id else b"-"
            raw: Any = await self.redis.xrange(link.stream, start, "+", count=GAP_PAGE)
            entries: list[tuple[bytes, dict[bytes, bytes]]] = raw
            if first and entries and int(entries[0][1][b"n"]) > link.last_n + 1:
                if await self._from_snapshot(link):
                    continue
                log.warning(
                    "room %s: stream entries %d to %d are gone from Redis; skipped",
                    link.name,
                    link.last_n + 1,
                    int(entries[0][1][b"n"]) - 1,
                )
            first = False
            for sid, fields in entries:
                n = int(fields[b"n"])
                if n > link.last_n:
                    self._entry(link, n, sid, fields[b"r"].decode(), fields[b"u"])
            if len(entries) < GAP_PAGE:
                return

    async def _from_snapshot(self, link: Link) -> bool:
        raw: Any = await self.redis.hgetall(link.snapshot)
        snap: dict[bytes, bytes] = raw
        if not snap or int(snap[b"n"]) <= link.last_n:
            return False
        self._entry(link, int(snap[b"n"]), snap[b"id"], "", snap[b"doc"])
        link.since_snapshot = 0
        return True

    # ------------------------------------------------------------------ liveness
    async def _check_replicas(self) -> None:
        """Remove the awareness states of agents whose replica's liveness key expired.
        Right after a reconnection (a Redis restart loses the keys) the others get a full
        lease period to write theirs again."""
        if time.monotonic() - self.up_since < LEASE_TTL:
            return
        others = {r for link in self.links.values() for r in link.replicas_seen()}
        if not others:
            return
        order = sorted(others)
        alive = await self.redis.exists(*(self.alive_key(r) for r in order))
        if alive == len(order):
            return
        for replica in order:
            if not await self.redis.exists(self.alive_key(replica)):
                self._gone(replica)

    def _gone(self, replica: str) -> None:
        total = sum(link.gone(replica) for link in list(self.links.values()))
        log.warning(
            "replica %s is gone (its liveness key expired): %d agent(s) of it removed",
            replica,
            total,
        )

    # ------------------------------------------------------------------ leases
    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            if not self.up:
                continue
            try:
                for link in list(self.links.values()):
                    await self._take_lease(link)
                    await self._check_gap(link)
                    await link.tick()
                    if link.persister and link.since_snapshot >= SNAPSHOT_AFTER:
                        await self._snapshot(link)
                await self._check_replicas()
            except _DOWN as exc:
                self._lost(exc)

    async def _check_gap(self, link: Link) -> None:
        """A message lost between Redis and this replica shows when the next one comes;
        this finds the last one lost, whose next one may never come: behind the counter
        at two checks in a row without progress (behind once is only messages on their
        way)."""
        n = await self.redis.get(link.counter)
        behind = n is not None and int(n) > link.last_n
        if behind and link.stuck_at == link.last_n:  # behind twice, with no progress
            self.gap(link)
        link.stuck_at = link.last_n if behind else None

    async def _take_lease(self, link: Link) -> None:
        """Take the room's persister lease if it is free; note its loss (the liveness
        thread renews it, ``Liveness``)."""
        held = self._liveness.leases
        try:
            if link.persister:
                if held.get(link.lease, False):
                    return
                held.pop(link.lease, None)
                link.persister = False
                link.storing(False)
                log.warning("room %s: persister lease lost to another replica", link.name)
            if await self.redis.set(link.lease, self.id, nx=True, px=int(LEASE_TTL * 1000)):
                held[link.lease] = True
                link.persister = True
                link.storing(True)
                log.info("room %s: this replica (%s) stores it", link.name, self.id)
                await link.store_whole()
        except _DOWN as exc:
            self._lost(exc)

    async def _snapshot(self, link: Link) -> None:
        """Write the room's state as the snapshot of its stream up to the last entry
        applied, and trim the stream before it. Not while the state lacks an entry
        applied (v2: updates waiting in the causal gate)."""
        if not link.snapshot_ready() or not link.last_id:
            return
        doc = link.state()
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(link.snapshot, mapping={"doc": doc, "n": link.last_n, "id": link.last_id})
            pipe.xtrim(link.stream, minid=link.last_id)
            await pipe.execute()
        link.since_snapshot = 0
        log.debug("room %s: snapshot at entry %d (%d bytes)", link.name, link.last_n, len(doc))
