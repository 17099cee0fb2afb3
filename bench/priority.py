"""Priority by standing (issue 16, docs/credits.md §4): with two askers on one busy
worker, the richer one's tasks start first, and the poorer one's still start within the
bound that ageing gives.

A v3 room (``--grant 100``), its broker and one echo worker with one slot and a delay per
word (a task takes ~0.3 s). The poorer asker gives 50 credits to the richer one through
the market (``igora credits send``): 150 credits (bucket 9) against 50 (bucket 7), so
``d`` = 2 and a poor task waits at most ``AGEING × (d + 1)`` = 30 s, plus the service of
what was queued before it, behind any stream of rich tasks.

1. **Who starts first**: the poorer asker submits 5 tasks, then the richer one 5; the
   order in which they start (their first piece) is recorded.
2. **The bounded wait**: the richer asker keeps 4 tasks in flight (3 always waiting)
   for the whole run; the poorer one submits one task every 5 s. The wait of each task
   from its submission to its first piece.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

from igora import Client
from igora.broker.standing import AGEING, bucket
from igora.credits.pricing import MILLI

from .common import Cluster, Section, Target, pct, table

NAME = "priority"
ROOM = "credits"
PROMPT = "one two three four"


async def first_piece(client: Client, text: str) -> tuple[float, float]:
    """(submitted, first piece) monotonic times of one streamed task."""
    submitted = time.monotonic()
    stream = await client.chat(text, stream=True, max_tokens=16)
    first = 0.0
    async for _ in stream:
        if not first:
            first = time.monotonic()
    return submitted, first


async def connect(c: Cluster, name: str) -> Client:
    os.environ["IGORA_DATA"] = c.agent_data(name)["IGORA_DATA"]  # its own identity
    client = Client(c.url, ROOM, name=name, timeout=300)
    await client.connect()
    await client.wait_for_worker(None, 30)
    return client


async def run(quick: bool) -> Section:
    duration, every = (25.0, 5.0) if quick else (60.0, 5.0)
    load_before = os.getloadavg()
    with Cluster(NAME) as c:
        c.market("--v3-room", ROOM, "--grant", "100")
        c.broker("--room", ROOM, name="broker", data=True)
        c.worker("--room", ROOM, "--slots", "1", "--delay", "0.05", name="worker", data=True)
        await c.wait_agents_async("worker", 1, timeout=120)
        await c.wait_agents_async("broker", 1, timeout=120)
        rich = await connect(c, "rich")
        poor = await connect(c, "poor")
        try:
            send = ["credits", "send", rich.id, "50", "--market", c.url, "--room", ROOM]
            given = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "igora", *send],
                env={**os.environ, **c.env, **c.agent_data("poor")},
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            )
            assert given.returncode == 0
            balances = {"rich": 150 * MILLI, "poor": 50 * MILLI}
            await asyncio.sleep(1.0)  # the standing document reaches the broker

            # 1. who starts first
            started: list[tuple[float, str]] = []

            async def timed(client: Client, who: str, i: int) -> None:
                _, first = await first_piece(client, f"{PROMPT} {who} {i}")
                started.append((first, who))

            poor_tasks = [asyncio.create_task(timed(poor, "poor", i)) for i in range(5)]
            await asyncio.sleep(0.05)
            rich_tasks = [asyncio.create_task(timed(rich, "rich", i)) for i in range(5)]
            await asyncio.gather(*poor_tasks, *rich_tasks)
            order = [who for _, who in sorted(started)]

            # 2. the bounded wait
            end = time.monotonic() + duration
            rich_waits: list[float] = []
            poor_waits: list[float] = []

            async def rich_loop(k: int) -> None:
                i = 0
                while time.monotonic() < end:
                    s, f = await first_piece(rich, f"{PROMPT} rich loop {k} {i}")
                    rich_waits.append(f - s)
                    i += 1

            async def poor_one(i: int) -> None:
                s, f = await first_piece(poor, f"{PROMPT} poor {i}")
                poor_waits.append(f - s)

            loops = [asyncio.create_task(rich_loop(k)) for k in range(4)]
            singles = []
            for i in range(int(duration // every)):
                await asyncio.sleep(every)
                singles.append(asyncio.create_task(poor_one(i)))
            await asyncio.gather(*loops)
            await asyncio.gather(*singles)
        finally:
            await rich.close()
            await poor.close()
    load_after = os.getloadavg()
    d = bucket(balances["rich"]) - bucket(balances["poor"])
    bound = AGEING * (d + 1)
    rest = order[1:]  # the first starts at once: the worker was free
    rich_first = rest == sorted(rest, key=lambda who: who != "rich")
    worst = max(poor_waits) if poor_waits else float("nan")
    data = {
        "order": order,
        "rich_waits_p50": pct(rich_waits, 50),
        "rich_waits_max": max(rich_waits) if rich_waits else None,
        "poor_waits": poor_waits,
        "buckets": [bucket(balances["rich"]), bucket(balances["poor"])],
        "bound_s": bound,
        "duration": duration,
        "load_before": load_before,
        "load_after": load_after,
    }
    body = (
        "One echo worker with one slot (~0.3 s a task), a v3 room granting 100 credits; the "
        "poorer asker gave 50 to the richer one: buckets "
        f"{bucket(balances['rich'])} and {bucket(balances['poor'])} (d = {d}), so a poor "
        f"task is passed for at most AGEING × (d + 1) = {bound:g} s. Load average (1 min) "
        f"before and after: {load_before[0]:.2f}, {load_after[0]:.2f}.\n\n"
        f"**Who starts first** (the poorer asker submits 5 tasks, 50 ms later the richer one "
        f"5; order of their first pieces): {' '.join(order)}.\n\n"
        f"**The bounded wait** (the richer asker keeps 4 tasks in flight for {duration:g} s, "
        f"the poorer one submits a task every {every:g} s; submission to first piece):\n\n"
        + table(
            ["asker", "tasks", "wait p50 s", "wait max s"],
            [
                [
                    "richer",
                    len(rich_waits),
                    f"{pct(rich_waits, 50):.2f}",
                    f"{max(rich_waits):.2f}" if rich_waits else "-",
                ],
                [
                    "poorer",
                    len(poor_waits),
                    f"{pct(poor_waits, 50):.2f}",
                    f"{worst:.2f}",
                ],
            ],
        )
    )
    targets = [
        Target(
            "The richer asker's waiting tasks start before the poorer one's (issue 16)",
            "after the one already running, all rich first",
            " ".join(order),
            rich_first,
            16,
        ),
        Target(
            "The poorer asker's tasks start within the ageing bound behind a rich stream",
            f"≤ {bound:g} s + one task",
            f"max {worst:.1f} s over {len(poor_waits)} tasks",
            worst <= bound + 1.0,
            16,
        ),
    ]
    return Section("Priority by standing (issue 16)", body, targets, data)
