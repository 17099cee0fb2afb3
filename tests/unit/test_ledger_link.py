"""A replica's side of the ledger (``igora.market.v3.ledger_link``, credits.md §7), without
Redis: which delivery records a replica keeps after a run document is dropped, and the
answers a replica gives for the holder."""

from __future__ import annotations

import time
from typing import Any

from pycrdt import Array, Doc, Map

from igora.credits.receipts import Delivery, RunEnd
from igora.market.replicas import Replicas
from igora.market.v3.ledger_link import ReplicaBank, _echo, _record_from
from igora.v3.tasks import CHUNKS, RUN, RunField, RunState

from .credits_world import ASKERS, MARKET

ROOM = "v3"
RUN_A, RUN_B = "r/w/a.1", "r/w/b.1"
ASKER = ASKERS[0].id


def _bank() -> ReplicaBank:
    # No connection is made until a loop uses it: these tests call no coroutine.
    replicas = Replicas("redis://127.0.0.1:9")
    return ReplicaBank(replicas, ":memory:", MARKET.id, receipt_wait=1.0, pinned={})


def _run_update(text: bytes) -> bytes:
    doc: Doc[Any] = Doc()
    with doc.transaction():
        doc.get(RUN, type=Map)[RunField.STATE] = RunState.DONE.value
        doc.get(CHUNKS, type=Array).append(text)
    return doc.get_update()


def test_an_unpaid_dropped_run_is_parked_and_a_paid_one_is_not() -> None:
    bank = _bank()
    for name in (RUN_A, RUN_B):
        bank.delivered(ROOM, name, _run_update(b"x" * 40), {ASKER})
    bank._forget_paid(ROOM, RUN_B)  # the holder said B was paid before its drop
    bank.dropped(ROOM, RUN_A)
    bank.dropped(ROOM, RUN_B)
    record = bank._record(ROOM, RUN_A)
    assert record is not None and record[1] == frozenset({ASKER})
    assert record[0].end is RunEnd.DONE and record[0].final
    assert bank._record(ROOM, RUN_B) is None
    assert not bank._paid  # forgotten with the drop
    bank._forget_paid(ROOM, RUN_A)  # paid after its drop: the parked view goes
    assert bank._record(ROOM, RUN_A) is None and not bank._parked


def test_a_parked_run_goes_after_its_time() -> None:
    bank = _bank()
    for name in (RUN_A, RUN_B):
        bank.delivered(ROOM, name, _run_update(b"x" * 40), {ASKER})
        bank.dropped(ROOM, name)
    view, _ = bank._parked[ROOM, RUN_A]
    bank._parked[ROOM, RUN_A] = (view, time.monotonic() - 1)  # its --receipt-wait passed
    bank._sweep()
    assert list(bank._parked) == [(ROOM, RUN_B)]


def test_a_delivery_record_crosses_redis_as_json_unchanged() -> None:
    record = (Delivery(RunEnd.ASKER_STOPPED, False, 123), frozenset({ASKER, "other"}))
    raw = {**record[0].to_json(), "readers": sorted(record[1])}
    assert _record_from(raw) == record
    for bad in (None, [], {"end": "nope", "final": True, "bytes": 1, "readers": []}, {}):
        assert _record_from(bad) is None


def test_an_unanswered_op_is_answered_with_what_its_sender_matches_on() -> None:
    header = {"id": "t" * 16, "model": "echo"}
    claim = {"op": "claim", "ids": ["w"], "body": {"header": header, "attempt": 2}}
    assert _echo(claim) == {"op": "claim", "task": "t" * 16, "attempt": 2}
    transfer = {"op": "transfer", "ids": ["a"], "body": {"nonce": "n1"}}
    assert _echo(transfer) == {"op": "transfer", "nonce": "n1"}
    assert _echo({"op": "balance", "ids": ["b", "a"], "body": {}}) == {"op": "balance", "id": "a"}


def test_an_op_too_large_for_redis_is_refused_by_the_replica_itself() -> None:
    bank = _bank()
    answers: list[tuple[int, dict[str, Any]]] = []
    header = {"id": "t" * 16, "model": "echo", "junk": "x" * 300_000}
    body = {"op": "claim", "header": header, "attempt": 1}
    bank.claim(
        ROOM, frozenset({"w"}), body, lambda w, m: "0.2", lambda c, a: answers.append((c, a))
    )
    assert [(c, a["result"], a["reason"], a["task"]) for c, a in answers] == [
        (422, "refused", "malformed", "t" * 16)
    ]
    assert not bank._out and not bank._requests  # nothing queued for Redis
