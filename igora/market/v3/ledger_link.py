"""Credits on replicas (docs/credits.md §7): one ledger for every replica of a market.

One replica, the holder of the lease ``igora:{MARKET}:lease:ledger``, keeps the ledger
and runs the ``Bank`` of one market over it. Every replica has a ``ReplicaBank``: what
its connections ask (grants, claims, transfers, balances) goes to its own ``Bank`` when
it holds the lease, else through Redis to the holder:

- ``igora:{MARKET}:ledger:in``, a stream read by the holder with a consumer group: an
  entry (``r`` the replica, ``q`` its request number, ``o`` the operation as JSON) is
  acknowledged and deleted once answered, i.e. once what it moved is on disk; a new
  holder first does again what its predecessor left pending (the ledger's unique keys
  make a second time a ``duplicate``);
- ``igora:{MARKET}:ledger:out:REPLICA``, a channel: the holder's answers to that
  replica's requests (the ``NOTICE`` code and JSON), and the delivery records it asked for;
- ``igora:{MARKET}:ledger:moved``, a channel: the balances the holder moved (kept in the
  hash ``igora:{MARKET}:ledger:balances`` for a replica that starts), and the runs paid,
  one message per turn of the holder's loop;
- ``igora:{MARKET}:ledger:ask``, a channel: the holder asks every replica for the
  delivery record of a run (a claim without receipt come due).

Delivery records stay on the replica that queued the run's updates for the asker; a run
document dropped before it was paid is parked there (its updates, not applied) until
the ``moved`` channel names it paid, or ``--receipt-wait`` + ``PARK_EXTRA`` seconds.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from redis.exceptions import ResponseError

from ...broker.standing import bucket
from ...credits import pricing
from ...credits.receipts import Delivery, RunEnd
from ..replicas import _DOWN, LEASE_TTL, TICK, Replicas
from .bank import Bank, DeliveredRun, Record, Reply

log = logging.getLogger("igora.credits")

ANSWER_WAIT = 10.0
"""Seconds a replica waits for the holder's answer before it answers 503 itself."""
ASK_WAIT = 2.0
"""Seconds the holder waits for the other replicas' delivery records of a run."""
PARK_EXTRA = 10.0
"""Seconds past ``--receipt-wait`` an unpaid dropped run stays parked."""
MAX_OP = 256 * 1024
"""Bytes of JSON an operation may have to go through Redis (a claim is ~1-2 KB)."""
GROUP = "holder"
BATCH = 200


def _key(market: str, what: str) -> str:
    # The braces keep the market's keys in one slot of a Redis cluster (its hash tag).
    return f"igora:{{{market}}}:{what}"


class ReplicaBank:
    """A replica's credits (``Credits``): its own ``Bank`` while it holds the ledger
    lease, the holder's through Redis otherwise. ``start`` and ``close`` from the
    market's lifespan, after the replicas started and before they stop."""

    def __init__(
        self,
        replicas: Replicas,
        path: Path | str,
        market: str,
        *,
        grant: int = pricing.DEFAULT_GRANT,
        receipt_wait: float,
        pinned: dict[str, str],
    ) -> None:
        self.replicas = replicas
        self.redis = replicas.redis
        self.path = path
        self.market = market
        self.grant_amount = grant
        self.receipt_wait = receipt_wait
        self.pinned = dict(pinned)
        self.prices = pricing.prices(grant, self.pinned)
        self.balances: dict[str, int] = {}
        self.on_change: Callable[[set[str]], None] = lambda accounts: None
        self.bank: Bank | None = None  # while this replica holds the lease
        self.lease = _key(market, "lease:ledger")
        self.stream = _key(market, "ledger:in")
        self.hash = _key(market, "ledger:balances")
        self.moved_channel = _key(market, "ledger:moved")
        self.ask_channel = _key(market, "ledger:ask")
        self.out = _key(market, f"ledger:out:{replicas.id}")
        self._numbers = itertools.count(1)
        # (request number, op, its JSON), in the order the connections asked
        self._out: collections.deque[tuple[str, str, str]] = collections.deque()
        self._wake = asyncio.Event()
        self._requests: dict[str, tuple[dict[str, Any], Reply, asyncio.TimerHandle]] = {}
        self._asks: dict[str, asyncio.Future[Record]] = {}
        self._views: dict[tuple[str, str], DeliveredRun] = {}
        self._paid: set[tuple[str, str]] = set()  # paid while their document is here
        self._parked: dict[tuple[str, str], tuple[DeliveredRun, float]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._spawned: set[asyncio.Task[Any]] = set()
        self._serving: asyncio.Task[None] | None = None
        self._moved_out: dict[str, int] = {}  # what the holder moved and has not said yet
        self._paid_out: list[list[str]] = []
        self._announcing = False

    # ------------------------------------------------------------------ lifespan
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for coro in (self._listen_loop(), self._lease_loop(), self._append_loop()):
            self._tasks.append(loop.create_task(coro))
        with contextlib.suppress(*_DOWN):
            await self._reload()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._give_up("the market stops", logging.INFO)
        for *_, timer in self._requests.values():
            timer.cancel()
        self._requests.clear()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._spawned.add(task)
        task.add_done_callback(self._spawned.discard)

    # ------------------------------------------------------------------ the lease
    def _holding(self) -> Bank | None:
        """This replica's ``Bank`` if it holds the lease still, as far as it knows."""
        return self.bank if self.replicas.leases.get(self.lease, False) else None

    async def _lease_loop(self) -> None:
        while True:
            try:
                if self.bank is None:
                    taken = await self.redis.set(
                        self.lease, self.replicas.id, nx=True, px=int(LEASE_TTL * 1000)
                    )
                    if taken:
                        self.replicas.leases[self.lease] = True
                        await self._take()
                elif not self.replicas.leases.get(self.lease, False):
                    await self._give_up("its lease was lost (cut off from Redis?)")
            except _DOWN as exc:
                log.debug("credits: the ledger lease cannot be checked: %s", exc)
            await asyncio.sleep(TICK)

    async def _take(self) -> None:
        """This replica holds the lease: open the ledger, publish its balances, serve."""

        def open_bank() -> Bank:
            return Bank(
                self.path,
                self.market,
                grant=self.grant_amount,
                receipt_wait=self.receipt_wait,
                pinned=self.pinned,
            )

        try:
            bank = await asyncio.to_thread(open_bank)
        except Exception as exc:
            log.error("credits: this replica cannot keep the ledger: %s", exc)
            await self.replicas.release(self.lease)
            return
        bank.on_change = self._moved_here
        bank.on_paid = self._paid_here
        bank.find_record = self._find_record
        self.bank = bank
        log.info(
            "credits: this replica (%s) keeps the ledger %s (%d accounts)",
            self.replicas.id,
            self.path,
            len(bank.balances),
        )
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.hash)
            if bank.balances:
                pipe.hset(self.hash, mapping=dict[Any, Any](bank.balances))
            pipe.publish(self.moved_channel, json.dumps({"reload": True}))
            await pipe.execute()
        self._serving = asyncio.get_running_loop().create_task(self._serve(bank))

    async def _give_up(self, why: str, level: int = logging.WARNING) -> None:
        bank, self.bank = self.bank, None
        if bank is None:
            return
        if self._serving is not None:
            self._serving.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._serving
            self._serving = None
        await bank.close()
        await self.replicas.release(self.lease)
        log.log(level, "credits: this replica no longer keeps the ledger: %s", why)

    # ------------------------------------------------------------------ the holder
    async def _serve(self, bank: Bank) -> None:
        """Do what the others appended: first what a former holder left pending, then
        each new entry as it comes. Redis away: again once it is back (emptied by a
        restart: the group is made again)."""
        pending = True
        while True:
            try:
                if pending:
                    await self._take_pending(bank)
                    pending = False
                batches: Any = await self.redis.xreadgroup(
                    GROUP, self.replicas.id, {self.stream: ">"}, count=BATCH, block=1000
                )
            except _DOWN as exc:
                log.debug("credits: the ledger's stream cannot be read: %s", exc)
                pending = pending or "NOGROUP" in str(exc)
                await asyncio.sleep(1.0)
                continue
            for _, entries in batches or []:
                for entry_id, fields in entries:
                    self._entry(bank, entry_id, fields)

    async def _take_pending(self, bank: Bank) -> None:
        with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists
            await self.redis.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        start: Any = "0-0"
        while True:
            claimed: Any = await self.redis.xautoclaim(
                self.stream, GROUP, self.replicas.id, 0, start_id=start, count=BATCH
            )
            for entry_id, fields in claimed[1]:
                self._entry(bank, entry_id, fields)
            start = claimed[0]
            if start in (b"0-0", "0-0"):
                return

    def _entry(self, bank: Bank, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        try:
            origin = fields[b"r"].decode()
            number = fields[b"q"].decode()
            op = json.loads(fields[b"o"])
        except (KeyError, UnicodeDecodeError, ValueError) as exc:
            log.error("credits: a malformed entry in the ledger's stream: %s", exc)
            self._spawn(self._done(entry_id))
            return
        answered = False

        def reply(code: int, body: dict[str, Any]) -> None:
            nonlocal answered
            if not answered:  # the first answer (a claim's 202) is the one it waits for
                answered = True
                self._spawn(self._answer(entry_id, origin, number, code, body))

        if not self._dispatch(bank, op, reply):  # no answer comes (a grant)
            self._spawn(self._done(entry_id))

    async def _answer(
        self, entry_id: bytes, origin: str, number: str, code: int, body: dict[str, Any]
    ) -> None:
        out = _key(self.market, f"ledger:out:{origin}")
        message = json.dumps({"q": number, "code": code, "body": body})
        with contextlib.suppress(*_DOWN):
            await self.redis.publish(out, message)
            await self._done(entry_id)

    async def _done(self, entry_id: bytes) -> None:
        with contextlib.suppress(*_DOWN):
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.xack(self.stream, GROUP, entry_id)
                pipe.xdel(self.stream, entry_id)
                await pipe.execute()

    @staticmethod
    def _dispatch(bank: Bank, op: dict[str, Any], reply: Reply) -> bool:
        """Hand ``op`` to ``bank``; False when no answer will come."""
        ids = frozenset(str(i) for i in op.get("ids", []))
        raw = op.get("body")
        body: dict[str, Any] = raw if isinstance(raw, dict) else {}
        kind = op.get("op")
        if kind == "welcome":
            bank.welcome(ids)
            return False
        if not ids:
            reply(422, {"op": kind, "result": "refused", "error": "no id proved"})
        elif kind == "claim":
            params: dict[str, str] = op.get("params") or {}
            room = str(op.get("room", ""))
            bank.claim(room, ids, body, lambda w, m: params.get(w, pricing.DEFAULT_PARAMS), reply)
        elif kind == "transfer":
            bank.transfer(ids, body, reply)
        elif kind == "balance":
            bank.balance_of(ids, body, reply)
        elif kind == "entries":
            bank.entries_of(ids, body, reply)
        else:
            reply(422, {"op": kind, "result": "refused", "error": "not a credits op"})
        return True

    def _moved_here(self, accounts: set[str]) -> None:
        """The holder's ``Bank`` moved balances: here at once, the others through Redis
        (what one turn of the loop moved, in one message: a group of settlements)."""
        bank = self.bank
        if bank is None:
            return
        moved = {a: bank.balance(a) for a in accounts}
        self._apply_moved(moved)
        self._moved_out.update(moved)
        self._announce()

    def _paid_here(self, room: str, name: str) -> None:
        self._forget_paid(room, name)
        self._paid_out.append([room, name])
        self._announce()

    def _announce(self) -> None:
        if not self._announcing:
            self._announcing = True
            asyncio.get_running_loop().call_soon(self._spawn, self._publish_moved())

    async def _publish_moved(self) -> None:
        self._announcing = False
        moved, self._moved_out = self._moved_out, {}
        paid, self._paid_out = self._paid_out, []
        with contextlib.suppress(*_DOWN):
            async with self.redis.pipeline(transaction=False) as pipe:
                if moved:
                    pipe.hset(self.hash, mapping=dict[Any, Any](moved))
                pipe.publish(self.moved_channel, json.dumps({"b": moved, "paid": paid}))
                await pipe.execute()

    async def _publish(self, channel: str, message: str) -> None:
        with contextlib.suppress(*_DOWN):
            await self.redis.publish(channel, message)

    async def _find_record(self, room: str, name: str) -> Record | None:
        """The delivery record of a run, from this replica or the first other replica
        that has one (``ASK_WAIT`` s at most)."""
        here = self._record(room, name)
        if here is not None:
            return here
        number = f"a{next(self._numbers)}"
        future: asyncio.Future[Record] = asyncio.get_running_loop().create_future()
        self._asks[number] = future
        ask = {"a": number, "r": self.replicas.id, "room": room, "name": name}
        try:
            await self.redis.publish(self.ask_channel, json.dumps(ask))
            return await asyncio.wait_for(future, ASK_WAIT)
        except (*_DOWN, asyncio.TimeoutError):
            return None
        finally:
            self._asks.pop(number, None)

    # ------------------------------------------------------------------ every replica
    def bucket(self, account: str) -> int:
        return bucket(self.balances.get(account, 0))

    def welcome(self, ids: frozenset[str]) -> None:
        bank = self._holding()
        if bank is not None:
            bank.welcome(ids)
        elif ids:
            self._send({"op": "welcome", "ids": sorted(ids)}, None)

    def claim(
        self,
        room: str,
        ids: frozenset[str],
        body: dict[str, Any],
        params_of: Callable[[str, str], str],
        reply: Reply,
    ) -> None:
        bank = self._holding()
        if bank is not None:
            bank.claim(room, ids, body, params_of, reply)
            return
        header = body.get("header")
        model = str(header.get("model")) if isinstance(header, dict) else "*"
        params = {i: params_of(i, model) for i in ids}  # the adverts are on this replica
        op = {"op": "claim", "ids": sorted(ids), "room": room, "body": body, "params": params}
        self._send(op, reply)

    def transfer(self, ids: frozenset[str], body: dict[str, Any], reply: Reply) -> None:
        bank = self._holding()
        if bank is not None:
            bank.transfer(ids, body, reply)
        else:
            self._send({"op": "transfer", "ids": sorted(ids), "body": body}, reply)

    def balance_of(self, ids: frozenset[str], body: dict[str, Any], reply: Reply) -> None:
        bank = self._holding()
        if bank is not None:
            bank.balance_of(ids, body, reply)
        else:
            self._send({"op": "balance", "ids": sorted(ids), "body": body}, reply)

    def entries_of(self, ids: frozenset[str], body: dict[str, Any], reply: Reply) -> None:
        bank = self._holding()
        if bank is not None:
            bank.entries_of(ids, body, reply)
        else:
            self._send({"op": "entries", "ids": sorted(ids), "body": body}, reply)

    def _send(self, op: dict[str, Any], reply: Reply | None) -> None:
        encoded = json.dumps(op, separators=(",", ":"))
        if len(encoded) > MAX_OP:  # junk for Redis and the holder: refused here
            if reply is not None:
                error = f"a credits op is at most {MAX_OP} bytes of JSON"
                reply(
                    422, {**_echo(op), "result": "refused", "reason": "malformed", "error": error}
                )
            return
        number = str(next(self._numbers))
        if reply is not None:
            timer = asyncio.get_running_loop().call_later(
                ANSWER_WAIT, self._unanswered, number, True
            )
            self._requests[number] = (_echo(op), reply, timer)
        self._out.append((number, str(op["op"]), encoded))
        self._wake.set()

    async def _append_loop(self) -> None:
        """Append what this replica's connections asked, in the order they asked (a
        grant before the balance that follows the handshake)."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._out:
                batch = [self._out.popleft() for _ in range(min(BATCH, len(self._out)))]
                try:
                    async with self.redis.pipeline(transaction=False) as pipe:
                        for number, _, encoded in batch:
                            fields = {"r": self.replicas.id, "q": number, "o": encoded}
                            pipe.xadd(self.stream, fields)  # type: ignore[arg-type]
                        await pipe.execute()
                except _DOWN as exc:
                    log.warning("credits: %d op(s) not sent to the ledger: %s", len(batch), exc)
                    for number, _, _ in batch:
                        self._unanswered(number, False)

    def _unanswered(self, number: str, queued: bool) -> None:
        """No answer: ``NOTICE 503``. ``queued``: the operation waits in the stream and
        will be done by the next holder (a worker's claim sent again is a duplicate)."""
        request = self._requests.pop(number, None)
        if request is None:
            return
        echo, reply, timer = request
        timer.cancel()
        if queued:
            error = (
                f"the market's ledger did not answer within {ANSWER_WAIT:g} s; the "
                "operation stays queued and is done once a replica keeps the ledger"
            )
        else:
            error = "the market's ledger cannot be reached (Redis): nothing was done"
        reply(503, {**echo, "result": "unavailable", "error": error})

    # ------------------------------------------------------------------ deliveries
    def delivered(self, room: str, name: str, update: bytes, readers: set[str]) -> None:
        DeliveredRun.note(self._views, (room, name), update, readers)

    def dropped(self, room: str, name: str) -> None:
        view = self._views.pop((room, name), None)
        if view is None:
            return
        if (room, name) in self._paid:
            self._paid.discard((room, name))
            return
        self._parked[room, name] = (view, time.monotonic() + self.receipt_wait + PARK_EXTRA)
        if len(self._parked) % 100 == 1:
            self._sweep()

    def _sweep(self) -> None:
        now = time.monotonic()
        for key in [k for k, (_, until) in self._parked.items() if until < now]:
            del self._parked[key]

    def _forget_paid(self, room: str, name: str) -> None:
        if self._parked.pop((room, name), None) is None and (room, name) in self._views:
            self._paid.add((room, name))

    def _record(self, room: str, name: str) -> Record | None:
        view = self._views.get((room, name))
        if view is None:
            parked = self._parked.get((room, name))
            view = parked[0] if parked is not None else None
        return view.record() if view is not None else None

    # ------------------------------------------------------------------ listening
    async def _reload(self) -> None:
        raw: Any = await self.redis.hgetall(self.hash)
        balances = {k.decode(): int(v) for k, v in raw.items()}
        changed = {
            a
            for a in balances.keys() | self.balances.keys()
            if balances.get(a) != self.balances.get(a)
        }
        self.balances = balances
        if changed:
            self.on_change(changed)

    def _apply_moved(self, moved: dict[str, int]) -> None:
        self.balances.update(moved)
        self.on_change(set(moved))

    async def _listen_loop(self) -> None:
        delay = 0.2
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(self.out, self.moved_channel, self.ask_channel)
                await self._reload()  # what moved while this replica was not listening
                delay = 0.2
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None:
                        self._message(message["channel"], message["data"])
            except _DOWN as exc:
                log.debug("credits: the ledger's channels are not heard: %s", exc)
            finally:
                with contextlib.suppress(*_DOWN):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _message(self, channel: bytes, data: bytes) -> None:
        try:
            body = json.loads(data)
        except ValueError:
            return
        if not isinstance(body, dict):
            return
        name = channel.decode()
        if name == self.out:
            self._answered(body)
        elif name == self.moved_channel:
            if body.get("reload"):
                self._spawn(self._reload_quietly())
            moved = body.get("b")
            if isinstance(moved, dict) and self.bank is None:  # the holder applied its own
                self._apply_moved({str(a): int(v) for a, v in moved.items()})
            for run in body.get("paid") or []:
                if isinstance(run, list) and len(run) == 2:
                    self._forget_paid(str(run[0]), str(run[1]))
        elif name == self.ask_channel:
            self._asked(body)

    async def _reload_quietly(self) -> None:
        with contextlib.suppress(*_DOWN):
            await self._reload()

    def _answered(self, body: dict[str, Any]) -> None:
        if "a" in body:  # a delivery record this replica asked for
            future = self._asks.get(str(body["a"]))
            record = _record_from(body.get("record"))
            if future is not None and record is not None and not future.done():
                future.set_result(record)
            return
        request = self._requests.pop(str(body.get("q")), None)
        if request is None:
            return  # answered 503 already: the operation stands, its answer is late
        _, reply, timer = request
        timer.cancel()
        answer = body.get("body")
        reply(int(body.get("code", 500)), answer if isinstance(answer, dict) else {})

    def _asked(self, body: dict[str, Any]) -> None:
        """The holder asks for a run's delivery record: answer if this replica has one."""
        if body.get("r") == self.replicas.id:
            return
        record = self._record(str(body.get("room")), str(body.get("name")))
        if record is None:
            return
        delivery, readers = record
        answer = {
            "a": body.get("a"),
            "record": {**delivery.to_json(), "readers": sorted(readers)},
        }
        out = _key(self.market, f"ledger:out:{body.get('r')}")
        self._spawn(self._publish(out, json.dumps(answer)))


def _record_from(raw: Any) -> Record | None:
    if not isinstance(raw, dict):
        return None
    try:
        delivery = Delivery(RunEnd(raw["end"]), bool(raw["final"]), int(raw["bytes"]))
        return delivery, frozenset(str(r) for r in raw["readers"])
    except (KeyError, TypeError, ValueError):
        return None


def _echo(op: dict[str, Any]) -> dict[str, Any]:
    """What an answer to ``op`` repeats so that its sender knows it (the bank's answers
    carry the same): a claim's task and attempt, a transfer's nonce, a balance's id."""
    body = op.get("body") if isinstance(op.get("body"), dict) else {}
    assert isinstance(body, dict)
    kind = op.get("op")
    if kind == "claim":
        header = body.get("header")
        tid = header.get("id") if isinstance(header, dict) else None
        task = tid[:40] if isinstance(tid, str) else "?"
        return {"op": kind, "task": task, "attempt": body.get("attempt")}
    if kind == "transfer":
        return {"op": kind, "nonce": body.get("nonce")}
    return {"op": kind, "id": body.get("id", min(op.get("ids") or [""]))}
