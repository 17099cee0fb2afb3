"""The ledger seen from the market's event loop: operations grouped per tick.

A market receives claims, grants and transfer orders as ``CONTROL`` frames (protocol-v3
step 7: ``igora.market.v3.bank``). ``LedgerWriter`` collects the operations that arrive within
``FLUSH_INTERVAL`` (50 ms, as the room store) and applies them in a thread as one group:
one transaction, one fsync for all of them, each operation in its own savepoint so a
refused claim fails alone. Each caller gets its own answer once the group has committed,
so a worker is told "settled" only for what is on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from ..market.store import FLUSH_INTERVAL
from .ledger import Ledger
from .receipts import Claim, Delivery, Settlement
from .transfer import TransferOrder

_Op = tuple[Callable[[], Any], "asyncio.Future[Any]"]


class LedgerWriter:
    """Grouped, off-loop access to one ``Ledger``; ``close`` applies what is pending."""

    def __init__(self, ledger: Ledger, interval: float = FLUSH_INTERVAL) -> None:
        self.ledger = ledger
        self.interval = interval
        self._pending: list[_Op] = []
        self._flusher: asyncio.Task[None] | None = None
        self._sleeping = False

    async def settle(
        self,
        claim: Claim,
        claimer: str,
        params: float | int | str,
        delivery: Delivery | None = None,
    ) -> tuple[Settlement, bool]:
        """Check ``claim`` (``ClaimError`` if refused) and record it: the settlement, and
        whether it moved balances (False: that run was settled already). The check runs
        in the writer's thread too: its signature checks are most of a claim's cost, and
        they leave the event loop free (libsodium runs without the GIL)."""

        result: tuple[Settlement, bool] = await self._submit(
            lambda: self.ledger.settlement(claim, claimer, params, delivery)
        )
        return result

    async def grant(self, account: str, amount: int) -> bool:
        return bool(await self._submit(lambda: self.ledger.grant(account, amount)))

    async def transfer(self, order: TransferOrder) -> bool:
        return bool(await self._submit(lambda: self.ledger.transfer(order)))

    async def _submit(self, op: Callable[[], Any]) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((op, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_later())
        return await future

    async def _flush_later(self) -> None:
        """Flush every ``interval`` while operations come: those submitted while a group
        was being written go in the next one (they would otherwise wait for another
        operation to start a flusher)."""
        while True:
            self._sleeping = True
            try:
                await asyncio.sleep(self.interval)
            finally:
                self._sleeping = False
            await self.flush()
            if not self._pending:
                return

    async def flush(self) -> None:
        """Apply what is pending now, as one group."""
        ops, self._pending = self._pending, []
        if not ops:
            return
        results = await asyncio.to_thread(self._apply, ops)
        for (_, future), (ok, value) in zip(ops, results, strict=True):
            if future.done():
                continue  # its caller was cancelled; the operation stands
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    def _apply(self, ops: list[_Op]) -> list[tuple[bool, Any]]:
        results: list[tuple[bool, Any]] = []
        try:
            with self.ledger.group():
                for op, _ in ops:
                    try:
                        results.append((True, op()))
                    except Exception as exc:  # its savepoint is undone; the others stand
                        results.append((False, exc))
        except Exception as exc:  # the commit failed: nothing of the group is on disk
            return [(False, exc)] * len(ops)
        return results

    async def close(self) -> None:
        """Apply what is pending, then stop (the ledger stays open: its owner closes it)."""
        flusher = self._flusher
        if flusher is not None and not flusher.done():
            if self._sleeping:
                flusher.cancel()  # no need to wait for the tick: flush now
            with contextlib.suppress(asyncio.CancelledError):
                await flusher  # a group being written: let it commit
        await self.flush()
