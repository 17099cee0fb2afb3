"""Chaos: the market process is killed (-9) with tasks waiting and running, then restarted
on the same port and data folder. Agents reconnect by themselves (backoff up to 5 s)."""

from __future__ import annotations

import asyncio

from igora import Client
from igora.protocol import MapName, State

from .conftest import Cluster
from .faults import archived, archived_async, executions, observer, wait_for

TOKENS = 40
EXPECTED = "".join(f"tok{i} " for i in range(TOKENS))


async def test_tasks_pending_when_the_market_dies_complete_after_its_restart(
    cluster: Cluster,
) -> None:
    market = cluster.market()
    broker = cluster.broker()
    worker = cluster.worker("--delay", "0.05", name="w")
    cluster.wait_agents("worker", 1)
    async with Client(cluster.url) as client:
        tasks = [await client.submit(f"n{i} #repeat {TOKENS}", timeout=120) for i in range(4)]
        results = [asyncio.ensure_future(t.result()) for t in tasks]
        doing, todos = client.agent.maps[MapName.DOING], client.agent.maps[MapName.TODOS]
        await wait_for(
            lambda: len(doing) == 1 and len(todos) == 3,
            20,
            "one task running, three waiting",
            cluster,
        )
        market.kill()
        assert not market.alive()
        await wait_for(lambda: not client.agent.connected, 10, "the client sees the market go")
        cluster.market()  # same port, same data folder
        # A newcomer finds the unfinished tasks in the restarted market.
        async with observer(cluster) as seer:
            pending = {
                k for m in (MapName.TODOS, MapName.PREPARED, MapName.DOING) for k in seer.maps[m]
            } | {
                k
                for k, v in seer.maps[MapName.DONE].items()
                if isinstance(v, dict) and v.get("state") == State.DONE.value
            }
            finished = {t.id for t in tasks if archived(cluster, t.id)}  # already read
            assert {t.id for t in tasks} <= pending | finished
        answers = await asyncio.wait_for(asyncio.gather(*results), 90)
    assert [a.text for a in answers] == [EXPECTED] * 4
    assert all(executions(worker)[t.id] == 1 for t in tasks)
    assert "reconnected" in broker.log() and "reconnected" in worker.log()
    for t in tasks:
        assert (await archived_async(cluster, t.id))["state"] == State.DONE.value
