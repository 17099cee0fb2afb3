"""A running market's member list (``igora.market.members.Membership``): a member added by
``igora market members add`` (another process writing the store) is admitted at once,
though the market reads the tables only every second."""

from __future__ import annotations

import asyncio
from pathlib import Path

from igora.market.members import NOT_MEMBER, REREAD, Membership
from igora.market.store import Store

from .credits_world import ASKERS, MARKET

ALICE, BOB = ASKERS[0].id, ASKERS[1].id


def test_a_member_added_a_moment_ago_is_admitted_and_a_stranger_still_refused(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        path = tmp_path / "market.sqlite3"
        market, cli = Store(path), Store(path)  # the running market, `igora market members`
        try:
            membership = Membership(market, "list", MARKET.id)
            cli.set_row("members", ALICE, "added a moment ago")
            membership.read_at -= REREAD  # the market's last read is REREAD old
            assert await membership.admit([ALICE], None) == ([ALICE], None)
            assert await membership.admit([BOB], None) == ([], NOT_MEMBER)
        finally:
            market.close()
            cli.close()

    asyncio.run(main())
