"""Credits in a market's v3 rooms (docs/credits.md): the ledger, grants, claims,
transfers, delivery records and the standing the broker orders by.

One ``Bank`` per market, over its ledger (``DATA/ledger.sqlite3``; in memory with
``--memory``) written through ``LedgerWriter`` (one transaction per 50 ms tick). What the
connections bring it (``CONTROL`` ops, protocol-v3.md §12 step 7):

- a first handshake of an identity: its grant (``--grant``, once in its life);
- ``claim`` with a receipt: checked (``Claim.check``, in the ledger writer's thread) and
  settled at once; the answer, a ``NOTICE`` 201 (settled, or already settled) or 422
  with the refusal's reason, comes once the group is on disk;
- ``claim`` without receipt (the worker's usage and run hash, sent only when no receipt
  paid the run: ``igora.v3.worker``): answered 202 and settled ``--receipt-wait``
  seconds later from the market's delivery record of the run, unless a receipt settled
  it meanwhile (same ledger key, so never twice);
- ``transfer``: a signed order of one of the connection's ids;
- ``balance``: the exact balance of one of the connection's ids (the gateway's 402).

**Delivery records.** For each run document ``r/<worker>/<tid>.<n>``, the updates the
room puts in the outbox of a reader other than its owner (the asker the broker attached)
are kept; applied to an empty document, they give the run as delivered, whose state and
chunk sizes are the ``Delivery`` of credits.md §3. They are applied only for a claim
without receipt that a receipt did not settle first, and forgotten with the run
document otherwise (a run dropped while its receipt is being settled: once that
settlement ends, unless the receipt was refused); the record of a run dropped while its
claim waits goes with the claim, settled from it or by a receipt that came after the
drop. Simplification: an update counts as delivered once queued for the asker's socket,
not once written (a frame queued when the socket broke is counted; it holds at most what
the worker wrote). Records are in memory:
a claim without receipt pending at a market's restart is lost (the worker's is not
resent), which favours the asker.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from pycrdt import Array, Doc, Map

from ...broker.standing import bucket
from ...credits import pricing
from ...credits.ledger import LEDGER_FILE, Ledger, LedgerError
from ...credits.receipts import Claim, ClaimError, Delivery, Reason, RunEnd
from ...credits.transfer import TransferError, TransferOrder
from ...credits.writer import LedgerWriter
from ...v3.crypto import TAG_BYTES
from ...v3.header import HeaderError, verify_header
from ...v3.tasks import CHUNKS, RUN, RunField, RunState, run_doc

log = logging.getLogger("igora.credits")

ENTRIES_SHOWN = 20
"""Entries a ``CONTROL entries`` answers unless it asks for another ``limit``."""
ENTRIES_MAX = 100

DEFAULT_RECEIPT_WAIT = 120.0
"""Seconds a claim without receipt waits for one before it is settled from the record."""

_ENDS = {
    RunState.DONE.value: RunEnd.DONE,
    RunState.ABORTED.value: RunEnd.ASKER_STOPPED,
    RunState.DOING.value: RunEnd.ASKER_STOPPED,  # the asker left mid-answer
    RunState.FAILED.value: RunEnd.WORKER_FAULT,
    RunState.HANDBACK.value: RunEnd.WORKER_FAULT,
}

Reply = Callable[[int, dict[str, Any]], None]
"""How an answer goes back: a NOTICE code and its JSON body."""

Record = tuple[Delivery, frozenset[str]]
"""What was delivered of a run, and to which ids (credits.md §3)."""


class Credits(Protocol):
    """What a market's rooms and connections ask of its credits: a ``Bank`` on one
    market, a ``ledger_link.ReplicaBank`` on replicas (credits.md §7)."""

    prices: dict[str, Any]
    pinned: dict[str, str]
    on_change: Callable[[set[str]], None]

    def bucket(self, account: str) -> int: ...
    def welcome(self, ids: frozenset[str]) -> None: ...
    def delivered(self, room: str, name: str, update: bytes, readers: set[str]) -> None: ...
    def dropped(self, room: str, name: str) -> None: ...
    def claim(
        self,
        room: str,
        ids: frozenset[str],
        body: dict[str, Any],
        params_of: Callable[[str, str], str],
        reply: Reply,
    ) -> None: ...
    def transfer(self, ids: frozenset[str], body: dict[str, Any], reply: Reply) -> None: ...
    def balance_of(self, ids: frozenset[str], body: dict[str, Any], reply: Reply) -> None: ...
    def entries_of(self, ids: frozenset[str], body: dict[str, Any], reply: Reply) -> None: ...
    async def close(self) -> None: ...


class DeliveredRun:
    """A run document as its asker received it: the updates queued for it, applied only
    when a claim without receipt needs the record (most runs are paid by receipt)."""

    def __init__(self) -> None:
        self.updates: list[bytes] = []
        self.readers: set[str] = set()

    @staticmethod
    def note(
        views: dict[tuple[str, str], DeliveredRun],
        run: tuple[str, str],
        update: bytes,
        readers: set[str],
    ) -> None:
        """Add ``update``, queued for ``readers``, to the view of ``run`` in ``views``."""
        view = views.get(run)
        if view is None:
            view = views[run] = DeliveredRun()
        view.updates.append(update)
        view.readers |= readers

    def record(self) -> Record:
        doc: Doc[Any] = Doc()
        for update in self.updates:
            try:
                doc.apply_update(update)
            except Exception:  # checked by the connection already: not expected
                log.warning("credits: an update does not apply to a delivery record")
        run = doc.get(RUN, type=Map)
        chunks = doc.get(CHUNKS, type=Array)
        state = run.get(RunField.STATE)
        sizes = [len(c) for c in chunks if isinstance(c, (bytes, bytearray))]
        end = _ENDS.get(str(state), RunEnd.ASKER_STOPPED)
        final = state == RunState.DONE.value and bool(sizes)
        plaintext = sum(max(0, n - TAG_BYTES) for n in sizes)
        return Delivery(end, final, plaintext), frozenset(self.readers)


def ledger_path(data: Path | None) -> Path | str:
    """Where a market keeps its ledger: its data folder, or memory (``--memory``)."""
    return data / LEDGER_FILE if data is not None else ":memory:"


class Bank:
    """A market's credits; ``start`` and ``close`` from its lifespan."""

    def __init__(
        self,
        path: Path | str,
        market: str,
        *,
        grant: int = pricing.DEFAULT_GRANT,
        receipt_wait: float = DEFAULT_RECEIPT_WAIT,
        pinned: Mapping[str, str] | None = None,
    ) -> None:
        self.ledger = Ledger(path, market)
        self.market = market
        self.grant_amount = grant
        self.receipt_wait = receipt_wait
        self.pinned: dict[str, str] = dict(pinned or {})  # model -> size (--model-params)
        self.prices = pricing.prices(grant, self.pinned)
        self.writer = LedgerWriter(self.ledger)
        self.balances: dict[str, int] = self.ledger.balances()  # exact: the one writer
        self.on_change: Callable[[set[str]], None] = lambda accounts: None
        # On replicas (credits.md §7): a run paid by receipt, and where the record of a
        # run delivered by another replica is asked for.
        self.on_paid: Callable[[str, str], None] = lambda room, name: None
        self.find_record: Callable[[str, str], Awaitable[Record | None]] | None = None
        self._granting: dict[str, asyncio.Future[Any]] = {}
        self._views: dict[tuple[str, str], DeliveredRun] = {}
        # The records of dropped runs whose claim without receipt is still held: each goes
        # with its claim (settled from it, or by a receipt), so they are never more than
        # the claims held (those of the last --receipt-wait seconds).
        self._records: dict[tuple[str, str], Record] = {}
        self._held: dict[tuple[str, str], asyncio.TimerHandle] = {}  # claims without receipt
        # runs whose claim with receipt is being settled: a worker sends its claim without
        # receipt only if that one is refused, perhaps after the run document's drop
        self._settling: collections.Counter[tuple[str, str]] = collections.Counter()
        # what was delivered of a run dropped while its receipt was being settled: made a
        # record only if the receipt is refused (nearly every run is paid by its receipt)
        self._parked: dict[tuple[str, str], DeliveredRun] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def balance(self, account: str) -> int:
        return self.balances.get(account, 0)

    def bucket(self, account: str) -> int:
        return bucket(self.balance(account))

    def _moved(self, deltas: dict[str, int]) -> None:
        for account, amount in deltas.items():
            self.balances[account] = self.balances.get(account, 0) + amount
        self.on_change(set(deltas))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ grants
    def welcome(self, ids: frozenset[str]) -> None:
        """A connection proved ``ids``: each gets its grant if it never had one."""
        for id_ in ids:
            if id_ not in self._granting and self.grant_amount > 0:
                future = asyncio.get_running_loop().create_future()
                self._granting[id_] = future
                self._spawn(self._grant(id_, future))

    async def _grant(self, id_: str, done: asyncio.Future[Any]) -> None:
        try:
            if await self.writer.grant(id_, self.grant_amount):
                self._moved({id_: self.grant_amount})
                log.info("credits: granted %s to %s", self._credits(self.grant_amount), id_[:8])
        except LedgerError as exc:
            log.warning("credits: no grant for %s: %s", id_[:8], exc)
        finally:
            done.set_result(None)

    @staticmethod
    def _credits(amount: int) -> str:
        return pricing.credits_text(amount)

    # ------------------------------------------------------------------ deliveries
    def delivered(self, room: str, name: str, update: bytes, readers: set[str]) -> None:
        """An update of run document ``name`` queued for readers proving ``readers``."""
        DeliveredRun.note(self._views, (room, name), update, readers)

    def dropped(self, room: str, name: str) -> None:
        """Run document ``name`` is gone: what was delivered of it is kept a while."""
        view = self._views.pop((room, name), None)
        if view is None:
            return
        if (room, name) in self._held:
            self._keep(room, name, view)
        elif (room, name) in self._settling:
            self._parked[room, name] = view
        # else no claim waits for it

    def _keep(self, room: str, name: str, view: DeliveredRun) -> None:
        self._records[room, name] = view.record()

    def _delivery(self, room: str, name: str) -> Record | None:
        view = self._views.get((room, name))
        return view.record() if view is not None else self._records.get((room, name))

    # ------------------------------------------------------------------ CONTROL ops
    def claim(
        self,
        room: str,
        ids: frozenset[str],
        body: dict[str, Any],
        params_of: Callable[[str, str], str],
        reply: Reply,
    ) -> None:
        """A worker's ``claim`` (``params_of(worker, model)``: the size in its advert)."""
        task = {"op": "claim", "task": _short(body.get("header")), "attempt": body.get("attempt")}
        try:
            claim = Claim.parse(body)
            receipt = claim.receipt
            claimer = receipt.worker if receipt is not None and receipt.worker in ids else min(ids)
            params = params_of(claimer, str(claim.header.get("model")))
            if receipt is None:  # checked whole when settled; its header now
                try:
                    verify_header(claim.header)
                except HeaderError as exc:
                    raise ClaimError(Reason.HEADER_SIGNATURE, str(exc)) from None
        except ClaimError as exc:
            reply(422, _refused(task, exc.reason.value, str(exc)))
            return
        if claim.receipt is not None:  # settling from now on (a drop may follow in this batch)
            self._settling[room, _run_doc(claimer, claim.header, claim.attempt)] += 1
            self._spawn(self._settle(claim, claimer, params, None, task, reply, room))
            return
        key = (room, _run_doc(claimer, claim.header, claim.attempt))
        if key in self._held:
            self._held[key].cancel()
        self._held[key] = asyncio.get_running_loop().call_later(
            self.receipt_wait,
            lambda: self._spawn(self._unsigned(key, claim, claimer, params, task)),
        )
        wait = f"{self.receipt_wait:g}"
        reply(202, {**task, "result": "pending", "error": f"settled in {wait} s without receipt"})

    async def _unsigned(
        self,
        key: tuple[str, str],
        claim: Claim,
        claimer: str,
        params: str,
        task: dict[str, Any],
    ) -> None:
        self._held.pop(key, None)
        record = self._delivery(*key)
        self._records.pop(key, None)
        if record is None and self.find_record is not None:  # delivered by another replica
            record = await self.find_record(*key)
        asker = str(claim.header.get("asker"))
        if record is None or asker not in record[1]:
            log.info("credits: task %s: no delivery to its asker recorded", task["task"])
            return
        await self._settle(claim, claimer, params, record[0], task, None)

    async def _settle(
        self,
        claim: Claim,
        claimer: str,
        params: str,
        delivery: Delivery | None,
        task: dict[str, Any],
        reply: Reply | None,
        room: str = "",
    ) -> None:
        run = (room, _run_doc(claimer, claim.header, claim.attempt))
        paid = False
        try:
            settlement, moved = await self.writer.settle(claim, claimer, params, delivery)
            paid = True
        except ClaimError as exc:
            log.info("credits: claim of task %s refused: %s", task["task"], exc)
            if reply is not None:
                reply(422, _refused(task, exc.reason.value, str(exc)))
            return
        except LedgerError as exc:
            log.error("credits: the ledger refused a settlement: %s", exc)
            if reply is not None:
                reply(422, _refused(task, "ledger", str(exc)))
            return
        finally:
            if delivery is None:
                self._settling[run] -= 1
                if self._settling[run] <= 0:
                    del self._settling[run]
                    parked = self._parked.pop(run, None)
                    if parked is not None and not paid:  # the worker's claim without it follows
                        self._keep(*run, parked)
        if delivery is None:  # paid by receipt: a claim without it has nothing left to wait for
            self.on_paid(*run)
            held = self._held.pop(run, None)
            if held is not None:
                held.cancel()
            self._records.pop(run, None)
        if moved:
            s = settlement
            self._moved({s.asker: -s.price, s.worker: s.price - s.tax})
            how = "receipt" if delivery is None else "delivery record"
            log.info(
                "credits: task %s attempt %d settled from its %s: %s from %s to %s",
                s.task,
                s.attempt,
                how,
                self._credits(s.price),
                s.asker[:8],
                s.worker[:8],
            )
        if reply is not None:
            result = "settled" if moved else "duplicate"
            reply(201, {**task, "result": result, "price": settlement.price})

    def transfer(self, ids: frozenset[str], body: dict[str, Any], reply: Reply) -> None:
        answer: dict[str, Any] = {"op": "transfer", "nonce": body.get("nonce")}
        try:
            order = TransferOrder.parse({k: v for k, v in body.items() if k != "op"})
            if order.sender not in ids:
                raise TransferError("a transfer order is sent by its sender's connection")
        except TransferError as exc:
            reply(422, _refused(answer, "malformed", str(exc)))
            return
        self._spawn(self._transfer(order, answer, reply))

    async def _transfer(self, order: TransferOrder, answer: dict[str, Any], reply: Reply) -> None:
        try:
            moved = await self.writer.transfer(order)
        except (TransferError, LedgerError) as exc:
            reply(422, _refused(answer, "refused", str(exc)))
            return
        if moved:
            self._moved({order.sender: -order.amount, order.to: order.amount})
        result = "settled" if moved else "duplicate"
        reply(201, {**answer, "result": result, "balance": self.balance(order.sender)})

    def balance_of(self, ids: frozenset[str], body: dict[str, Any], reply: Reply) -> None:
        id_ = body.get("id", min(ids))
        if id_ not in ids:
            reply(422, _refused({"op": "balance"}, "not_yours", "the balance of an id you proved"))
            return
        self._spawn(self._balance(str(id_), reply))

    async def _balance(self, id_: str, reply: Reply) -> None:
        granting = self._granting.get(id_)
        if granting is not None:
            await granting  # a first handshake's grant is on its way
        reply(201, {"op": "balance", "id": id_, "balance": self.balance(id_), "result": "ok"})

    def entries_of(self, ids: frozenset[str], body: dict[str, Any], reply: Reply) -> None:
        """The balance and last entries of one of the connection's ids (``igora credits
        --market``): what the ledger file shows on the market's machine."""
        id_ = body.get("id", min(ids))
        if id_ not in ids:
            reply(422, _refused({"op": "entries"}, "not_yours", "the entries of an id you proved"))
            return
        limit = body.get("limit", ENTRIES_SHOWN)
        limit = limit if type(limit) is int and 1 <= limit <= ENTRIES_MAX else ENTRIES_SHOWN
        self._spawn(self._entries(str(id_), limit, reply))

    async def _entries(self, id_: str, limit: int, reply: Reply) -> None:
        granting = self._granting.get(id_)
        if granting is not None:
            await granting
        rows = await asyncio.to_thread(self.ledger.entries, id_, limit)
        entries = [{**e.to_json(), "key": e.key} for e in rows]
        balance = self.balance(id_)
        reply(
            201,
            {"op": "entries", "id": id_, "balance": balance, "entries": entries, "result": "ok"},
        )

    # ------------------------------------------------------------------ lifespan
    async def close(self) -> None:
        for handle in self._held.values():
            handle.cancel()
        await self.writer.close()
        self.ledger.close()


def _run_doc(worker: str, header: dict[str, Any], attempt: int) -> str:
    return run_doc(worker, str(header.get("id")), attempt)


def _short(header: Any) -> str:
    tid = header.get("id") if isinstance(header, dict) else None
    return tid[:40] if isinstance(tid, str) else "?"


def _refused(answer: dict[str, Any], reason: str, error: str) -> dict[str, Any]:
    return {**answer, "result": "refused", "reason": reason, "error": error}


def notice_text(body: dict[str, Any]) -> str:
    """A credits answer as the text of its ``NOTICE``."""
    return json.dumps(body, separators=(",", ":"))
