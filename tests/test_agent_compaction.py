"""Agents compact their own documents (``Agent.compact``): a broker, a worker, a client and
the web view, all in this process on a real market, rebuild their documents while a long
answer streams and short tasks come and go. Nothing is lost or repeated: the streamed
answer arrives whole, piece by piece, exactly once; every short task is answered once;
the old documents are freed (nothing holds them); the agents keep merging with the
market and with each other after the switch."""

from __future__ import annotations

import asyncio
import gc
import weakref
from typing import Any

import pytest

from igora import Client, Restart
from igora.agent import Agent
from igora.broker.broker import Broker
from igora.config import market_address
from igora.engines.echo import EchoEngine
from igora.protocol import BROKER_STYLE, TEXT_STYLE, AgentType, State, TaskField
from igora.web.market_view import MarketTracker
from igora.worker.worker import Worker

from .conftest import Cluster
from .faults import wait_for

EVERY = 3  # tasks gone from done between two compactions of each agent


def size(agent: Agent) -> int:
    return len(agent.doc.get_update())


@pytest.mark.timeout(180)
async def test_agents_rebuild_their_documents_mid_stream(cluster: Cluster) -> None:
    cluster.market()
    address = market_address(cluster.url)
    broker_agent = Agent(
        address,
        type=AgentType.BROKER.value,
        name="broker",
        style=BROKER_STYLE,
        heartbeat=1,
        compact_every=EVERY,
    )
    broker = Broker(broker_agent)
    worker_agent = Agent(
        address,
        type=AgentType.WORKER.value,
        name="worker",
        style=TEXT_STYLE,
        heartbeat=1,
        state="busy",
        compact_every=EVERY,
    )
    worker = Worker(worker_agent, EchoEngine(delay=0.015), slots=4)
    client = Client(cluster.url, name="client")
    client.agent.compact_every = EVERY
    tracker = MarketTracker(client)
    agents = [broker_agent, worker_agent, client.agent]
    await broker_agent.start()
    await worker_agent.start()
    roles = [asyncio.create_task(broker.run()), asyncio.create_task(worker.run())]
    try:
        async with client:
            old_docs = [weakref.ref(a.doc) for a in agents]
            # A long answer streams (500 pieces, ~8 s) while short tasks come and go.
            long = await client.submit("#repeat 500", timeout=120)
            pieces: list[str] = []

            async def read_long() -> dict[str, Any]:
                final: dict[str, Any] = {}
                async for item in long.events():
                    if isinstance(item, dict):
                        final = item
                    else:
                        pieces.append(item)
                return final

            reader = asyncio.create_task(read_long())
            await wait_for(lambda: pieces, 20, "the first pieces of the long answer")
            answers: list[str] = []
            n = 0
            while not reader.done() and n < 400:
                batch = [client.chat(f"short {n + i}", timeout=60) for i in range(4)]
                answers += await asyncio.gather(*batch)
                n += 4
                await asyncio.sleep(0.05)
            during = [a.collected for a in agents]
            final = await reader
            assert final[TaskField.STATE] == State.DONE.value
            expected = "".join(f"tok{i} " for i in range(500))
            assert not any(isinstance(p, Restart) for p in pieces)
            assert "".join(pieces) == expected == final[TaskField.RESPONSE]
            # Read piece by piece to the end: had the stream's observer or the worker's
            # stream been left on an old document, the rest would have come at once from
            # done (thousands of characters in one piece).
            assert max(len(p) for p in pieces) < 200, sorted(len(p) for p in pieces)[-3:]
            assert answers == [f"Echo: short {i}" for i in range(n)]
            # Every agent compacted its document while the long task was streaming.
            assert all(c > 0 for c in during), during
            # The old documents are gone: no role keeps a map, an observer or a stream of one.
            gc.collect()
            assert [r() for r in old_docs] == [None, None, None]
            # Once the flow stops, every document settles to the live state.
            full = max(size(a) for a in agents)
            await wait_for(
                lambda: all(a.collected >= n for a in agents),
                30,
                "every agent to collect every finished task",
            )
            assert all(size(a) < 2_000 for a in agents), [size(a) for a in agents]
            # And they keep working together, with each other and with a newcomer.
            assert await client.chat("after", timeout=30) == "Echo: after"
            async with Client(cluster.url, name="newcomer") as newcomer:
                assert await newcomer.chat("newcomer", timeout=30) == "Echo: newcomer"
            # The web view counted every finished task once, across the rebuilds.
            await wait_for(lambda: len(tracker._counted) == n + 3, 10, "the view to count all")
            assert long.id in tracker._counted
            print(
                f"{n} short tasks; documents {full} bytes at most while flowing; "
                f"compactions {[a.compactions for a in agents]}"
            )
    finally:
        for r in roles:
            r.cancel()
        await asyncio.gather(*roles, return_exceptions=True)
        await worker_agent.stop()
        await broker_agent.stop()
