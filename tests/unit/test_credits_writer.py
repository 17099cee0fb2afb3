"""The ledger from an event loop (credits.writer): one transaction per tick, an answer
per caller once on disk, a refused claim failing alone."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from igora.credits.ledger import Ledger
from igora.credits.receipts import ClaimError, Reason
from igora.credits.writer import LedgerWriter

from .credits_world import ASKERS, MARKET, PARAMS, WORKERS, claim


async def test_claims_arriving_together_commit_as_one_group(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite3", MARKET.id)
    writer = LedgerWriter(ledger)
    claims = [claim(ASKERS[n % 10], WORKERS[n % 4], n) for n in range(40)]
    settled = await asyncio.gather(
        *(writer.settle(c, WORKERS[n % 4].id, PARAMS) for n, c in enumerate(claims))
    )
    assert [moved for _, moved in settled] == [True] * 40
    assert [s.task for s, _ in settled] == [c.header["id"] for c in claims]
    assert ledger.commits == 1  # forty runs, one transaction, one fsync
    again = await asyncio.gather(
        *(writer.settle(c, WORKERS[n % 4].id, PARAMS) for n, c in enumerate(claims))
    )
    assert [moved for _, moved in again] == [False] * 40 and ledger.commits == 2
    await writer.close()
    assert ledger.verify_chain() == 120
    ledger.close()


async def test_a_refused_claim_fails_alone_and_its_caller_hears_why(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite3", MARKET.id)
    writer = LedgerWriter(ledger)
    good = writer.settle(claim(ASKERS[0], WORKERS[0], 1), WORKERS[0].id, PARAMS)
    stolen = writer.settle(claim(ASKERS[0], WORKERS[0], 2), WORKERS[1].id, PARAMS)
    granted = writer.grant(ASKERS[1].id, 7_000)
    results = await asyncio.gather(good, stolen, granted, return_exceptions=True)
    assert results[0][1] is True and results[2] is True
    assert isinstance(results[1], ClaimError) and results[1].reason is Reason.WRONG_WORKER
    assert ledger.count() == 4 and ledger.commits == 1
    await writer.close()
    ledger.close()


async def test_close_applies_what_is_pending_without_waiting_for_the_tick(
    tmp_path: Path,
) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite3", MARKET.id)
    writer = LedgerWriter(ledger, interval=3600)
    pending = asyncio.ensure_future(writer.grant(ASKERS[0].id, 1_000))
    await asyncio.sleep(0)  # the grant is queued, its tick an hour away
    await asyncio.wait_for(writer.close(), 30)
    assert await pending is True and ledger.balance(ASKERS[0].id) == 1_000
    ledger.close()


async def test_an_operation_submitted_while_a_group_is_written_goes_in_the_next(
    tmp_path: Path,
) -> None:
    """A grant that arrives while the previous group is being committed is answered by
    the next group, with nothing else arriving to start it."""
    ledger = Ledger(tmp_path / "ledger.sqlite3", MARKET.id)
    writer = LedgerWriter(ledger, interval=0.01)
    written = asyncio.Event()
    apply = writer._apply

    def slow(ops: list[Any]) -> list[tuple[bool, Any]]:
        written.set()
        time.sleep(0.2)  # the group's commit, while the next grant arrives
        return apply(ops)

    writer._apply = slow  # type: ignore[method-assign]
    first = asyncio.ensure_future(writer.grant(ASKERS[0].id, 1_000))
    await written.wait()
    second = await asyncio.wait_for(writer.grant(ASKERS[1].id, 2_000), 10)
    assert await first is True and second is True
    assert ledger.balance(ASKERS[1].id) == 2_000 and ledger.commits == 2
    await writer.close()
    ledger.close()
