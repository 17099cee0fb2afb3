"""Traffic by role (issue #19): bytes each agent receives from the market per task, as
askers are added, protocol 2 against protocol 3.

One market, one broker and one echo worker (16 slots), each connected through a
counting TCP proxy (``bench.proxy``: websocket framing included), one measured asker in
this process through a proxy too, and K - 1 more askers in a load process
(two ``bench.load`` processes), every asker in a closed loop. Over a window the proxies count the
bytes the market sent each measured agent; the asker's are divided by its own answers,
the broker's and the worker's by all the answers of the window (the one worker serves
them all). With traffic scoped to those who act on it, each figure stays constant as
askers are added; when every agent reads the whole room, the asker's grows with them.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

from igora import Client

from .common import PROTOCOLS, Cluster, Section, Target, table
from .proxy import CountingProxy

NAME = "traffic"
ROLES = ("asker", "worker", "broker")


async def cell(protocol: int, askers: int, duration: float) -> dict[str, float]:
    with Cluster(f"traffic-{askers}", protocol) as c:
        c.room_market()
        async with (
            CountingProxy(c.port) as bp,
            CountingProxy(c.port) as wp,
            CountingProxy(c.port) as ap,
        ):
            c.room_broker("--market", bp.url)
            c.room_worker("--slots", "16", "--market", wp.url)
            await c.wait_agents_async("worker", 1, timeout=180)
            await c.wait_agents_async("broker", 1, timeout=180)
            # time for the askers to connect (protocol 3's one after the other) under load
            start = time.time() + 5.0 + 0.4 * askers
            end = start + duration
            others = askers - 1  # in two load processes, as in the throughput topic
            shares = [n for n in (others - others // 2, others // 2) if n > 0]
            outs = [c.dir / f"load-{i}.json" for i in range(len(shares))]
            loads = [
                c.spawn(
                    c.url,
                    str(n),
                    str(start),
                    str(duration),
                    str(out),
                    *c.load_args(f"load-{i}"),
                    name=f"load-{i}",
                    module="bench.load",
                )
                for i, (n, out) in enumerate(zip(shares, outs, strict=True))
            ]
            saved = os.environ.get("IGORA_DATA")
            os.environ.update(c.agent_data("asker"))  # its own identity (protocol 3)
            try:
                client = Client(ap.url, c.room, name="measured", connect_timeout=60)
                await client.connect()
            finally:
                if saved is None:
                    os.environ.pop("IGORA_DATA", None)
                else:
                    os.environ["IGORA_DATA"] = saved
            try:
                await client.wait_for_worker(None, 60)
                if time.time() > start:
                    raise RuntimeError(
                        f"the measured asker connected {time.time() - start:.1f} s late"
                    )
                mine: list[float] = []  # when each of its answers came in

                async def ask() -> None:
                    n = 0
                    while time.time() < end:
                        text = await client.chat(f"measured {n}")
                        assert text == f"Echo: measured {n}", text
                        n += 1
                        mine.append(time.time())

                asking = asyncio.create_task(ask())
                # the window is read at fixed times, whatever the answers' latency
                await asyncio.sleep(max(0.0, start - time.time()))
                counts = {"asker": ap.down, "worker": wp.down, "broker": bp.down}
                await asyncio.sleep(max(0.0, end - time.time()))
                got = {"asker": ap.down, "worker": wp.down, "broker": bp.down}
                await asking
            finally:
                await client.close()
            ends = list(mine)
            for load, out in zip(loads, outs, strict=True):
                while load.poll() is None:
                    await asyncio.sleep(0.2)
                ends += [t1 for _, t1 in json.loads(out.read_text())["done"]]
    mine_n = sum(1 for t in mine if start <= t <= end)
    total = sum(1 for t in ends if start <= t <= end)
    if loads and total == mine_n:
        raise RuntimeError(f"the other {askers - 1} askers answered nothing in the window")
    per = {
        "asker": (got["asker"] - counts["asker"]) / max(1, mine_n),
        "worker": (got["worker"] - counts["worker"]) / max(1, total),
        "broker": (got["broker"] - counts["broker"]) / max(1, total),
    }
    return {**per, "tasks": total, "mine": mine_n}


async def run(quick: bool) -> Section:
    duration = 3.0 if quick else 10.0
    sizes = (1, 10) if quick else (1, 10, 100)
    results: dict[str, dict[str, float]] = {}
    for k in sizes:
        for protocol in PROTOCOLS:  # back to back
            results[f"v{protocol}-{k}"] = await cell(protocol, k, duration)
    rows = []
    for k in sizes:
        r2, r3 = results[f"v2-{k}"], results[f"v3-{k}"]
        rows.append(
            [k]
            + [f"{r2[role]:,.0f} / {r3[role]:,.0f}" for role in ROLES]
            + [f"{int(r2['tasks'])} / {int(r3['tasks'])}"]
        )
    body = (
        f"Bytes the market sent each agent per task (v2 / v3), over a window of "
        f"{duration:g} s with K askers in closed loops, one broker and one echo worker; "
        "the asker's bytes are per answer it asked for, the broker's and the worker's per "
        "answer of the whole market.\n\n"
        + table(
            ["askers", "asker B/task v2 / v3", "worker B/task", "broker B/task", "tasks"],
            rows,
        )
    )
    targets = []
    for protocol in PROTOCOLS:
        growth = {
            role: results[f"v{protocol}-{sizes[-1]}"][role] / results[f"v{protocol}-1"][role]
            for role in ROLES
        }
        worst = max(growth, key=lambda role: growth[role])
        targets.append(
            Target(
                f"v{protocol}: bytes received per agent per task, 1 → {sizes[-1]} askers",
                "constant (growth ≤ 1.5 ×)",
                ", ".join(f"{role} × {growth[role]:.2f}" for role in ROLES) + f" (worst: {worst})",
                growth[worst] <= 1.5,
                19,
            )
        )
    return Section("Traffic by role: bytes received per task", body, targets, results)
