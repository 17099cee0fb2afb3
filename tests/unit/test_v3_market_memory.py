"""What a v3 market keeps per task goes with the task: after many tasks its per-task
structures are as small as after the first (the soak of issue #17, docs/benchmarks.md)."""

from __future__ import annotations

import asyncio
from typing import Any

from pycrdt import Array, Doc, Map

from igora.credits.receipts import Claim, run_hash
from igora.market.v3.bank import Bank
from igora.v3.tasks import CHUNKS, RUN, RunField, RunState, run_doc

from .credits_world import ASKERS, MARKET, PARAMS, WORKERS, claim, task_id

ROOM = "v3"


def _run_update() -> bytes:
    """A run document as a worker writes it: done, one chunk."""
    doc: Doc[Any] = Doc()
    with doc.transaction():
        doc.get(RUN, type=Map)[RunField.STATE] = RunState.DONE.value
        doc.get(CHUNKS, type=Array).append(b"x" * 40)
    return doc.get_update()


def test_a_receipt_after_the_runs_drop_leaves_no_delivery_record() -> None:
    """Each worker claims without receipt as its run ends, then with the asker's receipt;
    when it dropped the run between the two, the market made the run's delivery record
    for the claim waiting. The receipt settles the run: the record must go with the
    claim (it stayed, one per such run, up to 100,000)."""

    async def main() -> tuple[list[int], int, int, int]:
        bank = Bank(":memory:", MARKET.id)
        codes: list[int] = []

        def reply(code: int, answer: dict[str, Any]) -> None:
            codes.append(code)

        bank.welcome(frozenset(a.id for a in ASKERS))
        await asyncio.gather(*bank._granting.values())  # the grants are written
        update = _run_update()
        for n in range(60):
            asker, worker = ASKERS[n % len(ASKERS)], WORKERS[n % len(WORKERS)]
            paid = claim(asker, worker, n)
            unsigned = Claim(paid.header, 1, usage=(30, 200), run=run_hash([b"x" * 40]))
            name = run_doc(worker.id, task_id(n), 1)

            def send(c: Claim, worker: str = worker.id) -> None:
                body = {"op": "claim", **c.to_json()}
                bank.claim(ROOM, frozenset({worker}), body, lambda w, m: PARAMS, reply)

            bank.delivered(ROOM, name, update, {asker.id})  # the run, read by its asker
            send(unsigned)  # as the run ends
            bank.dropped(ROOM, name)  # the worker drops its run before the receipt came
            send(paid)  # with the receipt the asker wrote
        for _ in range(100):  # the settlements are written in groups (50 ms ticks)
            if codes.count(201) == 60:
                break
            await asyncio.sleep(0.05)
        kept = len(bank._records), len(bank._held), len(bank._views)
        await bank.close()
        return codes, *kept

    codes, records, held, views = asyncio.run(main())
    assert codes.count(202) == 60 and codes.count(201) == 60  # pending, then settled
    assert (records, held, views) == (0, 0, 0)
