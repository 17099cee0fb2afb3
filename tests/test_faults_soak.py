"""Soak: 10,000 tasks through market, broker and two echo workers (8 slots each), 100 in
flight from one client, with a short retention. Along the way a newcomer joins and syncs
the whole live document; its size, the sync time and the market's memory are printed
(``pytest -s``) and bounded.

What stays flat: the live entries (tasks and streams), and, because the market compacts
the room every few seconds (igora.market.compaction), the update a newcomer receives and
the market's memory. Without compaction each task would leave ~145 bytes of tombstones in
the update and ~2.5 KB in the market's memory (docs/faults.md): the bounds below are a
fifth and a half of that, so growth at the uncompacted rate fails.

``IGORA_SOAK_TASKS`` changes the number of tasks (at least 1,000).
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from igora import Client
from igora.protocol import MapName

from .conftest import Cluster
from .faults import observer, wait_for

N_TASKS = max(1_000, int(os.environ.get("IGORA_SOAK_TASKS", "10000")))
IN_FLIGHT = 100
RESIDUE_PER_TASK = 30  # bytes; measured with compaction: 3-55 (uncompacted: ~145)
RSS_PER_TASK = 1_250  # bytes; measured with compaction: 120-530 (uncompacted: ~2,500)


def market_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def newcomer(cluster: Cluster) -> tuple[int, float, int]:
    """A fresh agent syncs the room: (update bytes, seconds to sync, live entries)."""
    start = time.monotonic()
    async with observer(cluster, "newcomer") as agent:
        took = time.monotonic() - start
        return len(agent.doc.get_update()), took, sum(len(agent.maps[m]) for m in MapName)


@pytest.mark.timeout(600)
async def test_soak_keeps_the_live_document_bounded(cluster: Cluster) -> None:
    market = cluster.market("--log-level", "info")
    cluster.broker("--retention", "2")
    for name in ("w1", "w2"):
        cluster.worker("--slots", "8", name=name)
    cluster.wait_agents("worker", 2)
    cluster.wait_agents("broker", 1)
    checkpoints = sorted({N_TASKS // 10, N_TASKS // 5, N_TASKS // 2, N_TASKS})
    figures: list[tuple[int, int, float, int, int]] = []
    async with Client(cluster.url) as client:
        gate = asyncio.Semaphore(IN_FLIGHT)
        finished = 0
        wrong: list[str] = []

        async def one(i: int) -> None:
            nonlocal finished
            async with gate:
                answer = await client.chat(f"soak {i}", timeout=300)
            if answer != f"Echo: soak {i}":
                wrong.append(answer)
            finished += 1

        started = time.monotonic()
        jobs = [asyncio.ensure_future(one(i)) for i in range(N_TASKS)]
        try:
            for mark in checkpoints:
                while finished < mark:
                    if any(j.done() and j.exception() for j in jobs):
                        break
                    await asyncio.sleep(0.05)
                if mark == N_TASKS:
                    await asyncio.gather(*jobs)
                at, when = finished, time.monotonic() - started
                size, took, live = await newcomer(cluster)
                figures.append((at, size, took, live, market_rss(market.pid)))
                print(f"{at:6d} tasks {when:6.1f} s: newcomer sync "
                      f"{size / 1e6:5.2f} MB in {took * 1000:4.0f} ms, {live} live entries, "
                      f"market RSS {figures[-1][4] / 1e6:5.1f} MB")
                assert live <= 3 * IN_FLIGHT  # in flight only: finished tasks have left
        finally:
            for j in jobs:
                j.cancel()
        elapsed = time.monotonic() - started
    assert not wrong, wrong[:3]
    print(f"{N_TASKS} tasks in {elapsed:.1f} s ({N_TASKS / elapsed:.0f} tasks/s)")
    # Nothing is left in the live document once the flow stops.
    async with observer(cluster, "last") as last:
        await wait_for(lambda: sum(len(last.maps[m]) for m in MapName) == 0, 30,
                       "every finished task and stream left the live document", cluster)
    # From the second checkpoint: the first thousand tasks also warm the market up.
    (first_n, first_size, _, _, first_rss), (last_n, last_size, _, _, last_rss) = \
        figures[1], figures[-1]
    residue = (last_size - first_size) / (last_n - first_n)
    # Memory from the middle checkpoint: the market's high-water mark settles after a few
    # compactions (every 2 s), i.e. later in tasks when tasks flow faster (at ~550 tasks/s
    # it is still rising at N/5, then flat: 62.4 -> 62.9 MB from 3,000 to 30,000 tasks).
    mid_n, mid_rss = figures[-2][0], figures[-2][4]
    growth = (last_rss - mid_rss) / (last_n - mid_n)
    print(f"residue {residue:.0f} bytes/task in the update, market RSS {growth:.0f} bytes/task")
    assert residue < RESIDUE_PER_TASK
    assert growth < RSS_PER_TASK
