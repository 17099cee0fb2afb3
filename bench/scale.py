"""Scale (issue #8): one market with 1,000 connected agents, with awareness churn
(heartbeats, and agents leaving and joining every second): the market's memory and CPU,
and the latency of a small document update and of an awareness change between two
probe agents in the same room, compared with the same probes on an empty market.

The 1,000 agents are light y-websocket connections in four ``bench.swarm`` processes:
each speaks the wire protocol like any agent (sync, awareness heartbeat, goodbye) and
receives the whole room's traffic, but keeps no document, so the market is what is
measured.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from igora.agent import Agent
from igora.config import MarketAddress
from igora.testing import wait_for

from .common import Cluster, Section, cpu_seconds, ms, pct, rss_mb, table
from .sync import round_trips

NAME = "scale"
HEARTBEAT = 5.0  # Igora's default awareness heartbeat
CHURN = 5.0  # agents replaced per second, in all


async def awareness_latency(url: str, n: int, url_b: str | None = None) -> list[float]:
    """A changes a field of its awareness state; time until B sees it (B on ``url_b``,
    another replica of A's market, if given)."""
    a, b = (
        Agent(
            MarketAddress(u, "market"),
            type="client",
            name=f"probe-{x}",
            style="text",
            connect_timeout=120,
        )
        for x, u in (("a", url), ("b", url_b or url))
    )
    await a.start()
    await b.start()
    seen: asyncio.Queue[int] = asyncio.Queue()
    cid = a.awareness.client_id

    def on_b(topic: str, change: Any) -> None:
        state = b.awareness.states.get(cid) or {}
        if isinstance(state.get("probe"), int):
            seen.put_nowait(state["probe"])

    b.awareness.observe(on_b)
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        a.set_state(probe=i)
        while True:
            got = await asyncio.wait_for(seen.get(), 60)
            if got == i:
                break
        out.append(time.perf_counter() - t0)
        await asyncio.sleep(0.02)
    await a.stop()
    await b.stop()
    return out


async def probe(url: str, n: int, url_b: str | None = None) -> dict[str, float]:
    rtt = await round_trips(url, n, room="market", url_b=url_b)
    aw = await awareness_latency(url, n, url_b)
    return {
        "update_p50": pct(rtt, 50),
        "update_p99": pct(rtt, 99),
        "aware_p50": pct(aw, 50),
        "aware_p99": pct(aw, 99),
    }


async def run(quick: bool) -> Section:
    agents = 1000
    procs = 4
    n_probe = 50 if quick else 200
    with Cluster("scale") as c:
        market = c.market("--max-per-address", "5000", "--max-connections", "5000")
        base = await probe(c.url, n_probe)
        rss0 = rss_mb(market.pid)
        ready = [c.dir / f"ready-{i}" for i in range(procs)]
        t0 = time.monotonic()
        for i in range(procs):
            c.spawn(
                c.url,
                str(agents // procs),
                str(HEARTBEAT),
                str(CHURN / procs),
                "3600",
                str(ready[i]),
                name=f"swarm{i}",
                module="bench.swarm",
            )
        await wait_for(
            lambda: all(r.exists() for r in ready),
            600,
            f"the swarm connected (logs in {c.dir})",
            every=0.5,
        )
        connect_time = time.monotonic() - t0
        await asyncio.sleep(5)  # heartbeats and churn settle into their rhythm
        status = await asyncio.to_thread(c.status)
        connected = status["connections"]
        cpu0, w0 = cpu_seconds(market.pid), time.monotonic()
        loaded = await probe(c.url, n_probe)
        cpu = (cpu_seconds(market.pid) - cpu0) / (time.monotonic() - w0)
        rss1 = rss_mb(market.pid)
    rows = [
        ["connections", "2 (probes)", f"{connected} (+2 probes)"],
        ["market memory (RSS) MiB", f"{rss0:.0f}", f"{rss1:.0f}"],
        ["market CPU (share of one core)", "-", f"{cpu * 100:.0f} %"],
        [
            "small update round trip p50 / p99 ms",
            f"{ms(base['update_p50'])} / {ms(base['update_p99'])}",
            f"{ms(loaded['update_p50'])} / {ms(loaded['update_p99'])}",
        ],
        [
            "awareness change seen p50 / p99 ms",
            f"{ms(base['aware_p50'])} / {ms(base['aware_p99'])}",
            f"{ms(loaded['aware_p50'])} / {ms(loaded['aware_p99'])}",
        ],
    ]
    body = (
        f"{agents} light agents in {procs} processes, awareness heartbeat {HEARTBEAT:g} s "
        f"(Igora's default), {CHURN:g} agents replaced per second (leave + join); connecting "
        f"them all took {connect_time:.0f} s. Probes: two more agents in the same room, "
        f"{n_probe} round trips of a small document update and {n_probe} awareness "
        "changes.\n\n" + table(["measure", "empty market", f"{agents} agents + churn"], rows)
    )
    data = {
        "base": base,
        "loaded": loaded,
        "rss0": rss0,
        "rss1": rss1,
        "cpu": cpu,
        "connect_time": connect_time,
        "connections": connected,
    }
    return Section(f"Scale: one market, {agents} agents", body, [], data)
