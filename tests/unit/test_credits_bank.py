"""The market's bank and a worker's claims: a worker sends its claim without receipt only
if no receipt pays the run first (``igora.v3.worker``), so the delivery record of a run
dropped while its receipt is being settled must outlive a refusal, and only then."""

from __future__ import annotations

import asyncio
from typing import Any

from pycrdt import Array, Doc, Map

from igora.credits.receipts import Claim, run_hash
from igora.market.v3.bank import Bank
from igora.v3.tasks import CHUNKS, RUN, run_doc

from .credits_world import ASKERS, MARKET, PARAMS, WORKERS, header, receipt, task_id

ROOM = "v3"
ASKER, WORKER = ASKERS[0], WORKERS[0]
TID = task_id(1)
RUN_DOC = run_doc(WORKER.id, TID, 1)


def _run_update() -> bytes:
    """A run done, as its asker received it: its state and one chunk of 200 bytes."""
    doc: Doc[Any] = Doc()
    with doc.transaction():
        doc.get(RUN, type=Map).update({"state": "done"})
        doc.get(CHUNKS, type=Array).append(b"c" * 200)
    return doc.get_update()


async def _until(replies: list[tuple[int, dict[str, Any]]], n: int) -> None:
    for _ in range(200):
        if len(replies) >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{len(replies)} answers, not {n}: {replies}")


async def _receipt_then_drop(advertised: str) -> tuple[Bank, list[tuple[int, dict[str, Any]]]]:
    """The worker's claim with the asker's receipt, and the run document's drop in the
    same batch (the market reads both before the settlement starts)."""
    bank = Bank(":memory:", MARKET.id, grant=10**6, receipt_wait=0.1)
    bank.welcome(frozenset({ASKER.id}))
    bank.delivered(ROOM, RUN_DOC, _run_update(), {ASKER.id})
    head = header(ASKER, TID)
    body = Claim(head, 1, receipt(ASKER, WORKER, head)).to_json()
    replies: list[tuple[int, dict[str, Any]]] = []
    bank.claim(
        ROOM,
        frozenset({WORKER.id}),
        {"op": "claim", **body},
        lambda worker, model: advertised,
        lambda code, answer: replies.append((code, answer)),
    )
    bank.dropped(ROOM, RUN_DOC)
    await _until(replies, 1)
    return bank, replies


def test_a_run_paid_by_its_receipt_keeps_no_delivery_record() -> None:
    async def main() -> None:
        bank, replies = await _receipt_then_drop(PARAMS)
        try:
            assert replies[0][0] == 201 and replies[0][1]["result"] == "settled"
            assert bank.balance(WORKER.id) > 0
            assert bank._delivery(ROOM, RUN_DOC) is None  # nothing kept for it
        finally:
            await bank.close()

    asyncio.run(main())


def test_a_refused_receipt_leaves_the_record_for_the_claim_without_receipt() -> None:
    """The receipt is refused (priced for another size than the worker advertises): the
    worker's claim without receipt, sent then, after the drop, is settled from what was
    delivered."""

    async def main() -> None:
        bank, replies = await _receipt_then_drop("7")
        try:
            assert replies[0][0] == 422 and replies[0][1]["reason"] == "wrong_price"
            assert bank.balance(WORKER.id) == 0
            head = header(ASKER, TID)
            unsigned = Claim(head, 1, usage=(30, 20), run=run_hash([b"c" * 200])).to_json()
            bank.claim(
                ROOM,
                frozenset({WORKER.id}),
                {"op": "claim", **unsigned},
                lambda worker, model: "7",
                lambda code, answer: replies.append((code, answer)),
            )
            await _until(replies, 2)
            assert replies[1][0] == 202
            for _ in range(200):
                if bank.balance(WORKER.id) > 0:
                    break
                await asyncio.sleep(0.01)
            assert bank.balance(WORKER.id) > 0  # settled from the delivery record
        finally:
            await bank.close()

    asyncio.run(main())


def test_entries_are_answered_for_an_id_the_connection_proved_only() -> None:
    """``CONTROL entries`` (``igora credits --market``): the balance and last entries of
    one's own id, at most ``limit`` of them; another's id is refused."""

    async def main() -> None:
        bank = Bank(":memory:", MARKET.id, grant=5_000)
        replies: list[tuple[int, dict[str, Any]]] = []

        def reply(code: int, answer: dict[str, Any]) -> None:
            replies.append((code, answer))

        mine = frozenset({ASKER.id})
        try:
            bank.welcome(mine)
            bank.entries_of(mine, {"op": "entries", "id": ASKER.id, "limit": 5}, reply)
            bank.entries_of(mine, {"op": "entries", "id": WORKER.id}, reply)
            await _until(replies, 2)
            (code, refused), (ok, answer) = sorted(replies, key=lambda r: r[0] != 422)
            assert (code, refused["reason"]) == (422, "not_yours")
            assert (ok, answer["id"], answer["balance"]) == (201, ASKER.id, 5_000)
            assert [(e["kind"], e["amount"], e["key"]) for e in answer["entries"]] == [
                ("grant", 5_000, f"grant:{ASKER.id}")
            ]
        finally:
            await bank.close()

    asyncio.run(main())
