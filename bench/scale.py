"""Scale (issues #8 and #19): one market with 1,000 connected agents, with churn
(heartbeats, and agents leaving and joining every second): the market's memory and CPU,
and the latency of a small document update and of a presence change between two probe
agents in the same room, compared with the same probes on an empty market; protocol 2
against protocol 3, one after the other.

The 1,000 agents are light agents in four ``bench.swarm`` processes. Protocol 2: y-websocket
connections that speak the wire protocol like any agent (sync, awareness heartbeat,
goodbye) and receive the whole room's traffic, but keep no document, so the market is what
is measured. Protocol 3: ``Session``s with their own identities, present and reading
nothing (what an idle client is in protocol 3).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from nacl.signing import SigningKey
from pycrdt import Map

from igora.agent import Agent
from igora.config import MarketAddress
from igora.identity import Identity
from igora.testing import wait_for
from igora.v3.session import Event, EventKind, Session

from .common import (
    PROTOCOLS,
    Cluster,
    Section,
    Target,
    against_v2,
    cpu_seconds,
    ms,
    pct,
    rss_mb,
    table,
)
from .sync import round_trips
from .throughput import one

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


def v3_session(url: str, room: str, name: str) -> Session:
    return Session(
        MarketAddress(url, room),
        Identity(SigningKey.generate()),
        name=name,
        state={"type": "client", "name": name},
        connect_timeout=120,
    )


async def v3_probe(url: str, room: str, n: int) -> dict[str, float]:
    """Protocol 3's probes: A writes ping i into ``a/A``, B (subscribed to it) answers
    pong i in ``w/B`` (A subscribed to it): the update round trip; then A changes its
    presence name, B (subscribed to ``who``, as a broker may) times until ``who`` shows it."""
    a, b = v3_session(url, room, "probe-a"), v3_session(url, room, "probe-b")
    await a.start()
    await b.start()
    ida, idb = a.identities[0].id, b.identities[0].id
    ma = a.own(f"a/{ida}").get("bench", type=Map)
    mb = b.own(f"w/{idb}").get("bench", type=Map)
    b.subscribe(f"a/{ida}")
    a.subscribe(f"w/{idb}")
    who = b.subscribe("who")
    pongs: asyncio.Queue[int] = asyncio.Queue()
    names: asyncio.Queue[str] = asyncio.Queue()

    def on_b(event: Event) -> None:
        if event.kind is EventKind.CHANGED and event.name == f"a/{ida}":
            ping = b.docs[event.name].get("bench", type=Map).get("ping")
            if ping is not None:
                asyncio.get_running_loop().call_soon(mb.__setitem__, "pong", ping)
        elif event.kind is EventKind.CHANGED and event.name == "who" and who is not None:
            # b.docs, not the Doc subscribe returned: the market replaces ``who`` by a new
            # epoch every 500 updates (protocol-v3.md §12.6), as churn soon makes it do
            entry = b.docs["who"].get("agents", type=Map).get(ida)
            if entry is not None:
                names.put_nowait(str(entry.get("name")))

    def on_a(event: Event) -> None:
        if event.kind is EventKind.CHANGED and event.name == f"w/{idb}":
            pong = a.docs[event.name].get("bench", type=Map).get("pong")
            if pong is not None:
                pongs.put_nowait(int(pong))

    b.observe(on_b)
    a.observe(on_a)
    try:
        return await _probe_loops(n, ma, a, pongs, names)
    finally:
        await a.stop()
        await b.stop()


async def _probe_loops(
    n: int, ma: Map, a: Session, pongs: asyncio.Queue[int], names: asyncio.Queue[str]
) -> dict[str, float]:
    rtt, seen = [], []
    for i in range(n + 10):
        t0 = time.perf_counter()
        ma["ping"] = i
        while await asyncio.wait_for(pongs.get(), 30) != i:
            pass
        if i >= 10:
            rtt.append(time.perf_counter() - t0)
    for i in range(n):
        t0 = time.perf_counter()
        a.set_state(name=f"probe-{i}")
        while await asyncio.wait_for(names.get(), 30) != f"probe-{i}":
            pass
        seen.append(time.perf_counter() - t0)
        await asyncio.sleep(0.02)
    return {
        "update_p50": pct(rtt, 50),
        "update_p99": pct(rtt, 99),
        "aware_p50": pct(seen, 50),
        "aware_p99": pct(seen, 99),
    }


async def probe(c: Cluster, n: int) -> dict[str, float]:
    """The probes of the cluster's protocol."""
    if c.room is not None:
        return await v3_probe(c.url, c.room, n)
    return await probe_v2(c.url, n)


async def probe_v2(url: str, n: int, url_b: str | None = None) -> dict[str, float]:
    """Protocol 2's probes (``url_b``: the second probe agent on another replica)."""
    try:
        rtt = await round_trips(url, n, room="market", url_b=url_b)
    except TimeoutError:  # a round trip over 10 s: reported as such, the rest measured
        rtt = [float("inf")]
    try:
        aw = await awareness_latency(url, n, url_b)
    except TimeoutError:
        aw = [float("inf")]
    return {
        "update_p50": pct(rtt, 50),
        "update_p99": pct(rtt, 99),
        "aware_p50": pct(aw, 50),
        "aware_p99": pct(aw, 99),
    }


async def swarm(c: Cluster, agents: int, procs: int, patience: float) -> float:
    """Start ``agents`` light agents in ``procs`` ``bench.swarm`` processes and wait until
    all are connected: how long that took (AssertionError after ``patience`` s)."""
    ready = [c.dir / f"ready-{i}" for i in range(procs)]
    t0 = time.monotonic()
    v3 = [] if c.room is None else ["--v3", c.room]
    for i in range(procs):
        c.spawn(
            c.url,
            str(agents // procs),
            str(HEARTBEAT),
            str(CHURN / procs),
            "3600",
            str(ready[i]),
            *v3,
            name=f"swarm{i}",
            module="bench.swarm",
            env=c.agent_data(f"swarm{i}"),
        )
    await wait_for(
        lambda: all(r.exists() for r in ready),
        patience,
        f"the swarm connected (logs in {c.dir})",
        every=0.5,
    )
    return time.monotonic() - t0


async def crowd(protocol: int, agents: int, patience: float) -> dict[str, Any]:
    """``agents`` connect (with churn), then a broker, a worker and 10 clients come and
    ask tasks for 5 s: how long the crowd took to connect, and the tasks served."""
    with Cluster(f"crowd-{agents}", protocol) as c:
        market = c.room_market("--max-per-address", "10000", "--max-connections", "10000")
        try:
            connect_time = await swarm(c, agents, 4, patience)
        except AssertionError:
            try:
                status = await asyncio.to_thread(c.status)
                connections: int | str = status["connections"]
            except OSError:  # a socket timeout too
                connections = "unknown: the market did not answer /status within 10 s"
            return {"connected": False, "connections": connections}
        broker = c.room_broker()
        c.room_worker("--slots", "4")
        await c.wait_agents_async("worker", 1, timeout=300)
        await c.wait_agents_async("broker", 1, timeout=300)
        status = await asyncio.to_thread(c.status)
        served = await one(c, (market.pid, broker.pid), 10, 5.0)
        return {
            "connected": True,
            "connect_time": connect_time,
            "connections": status["connections"],
            "rss": rss_mb(market.pid),
            **served,
        }


async def measure(protocol: int, agents: int, n_probe: int, procs: int = 4) -> dict[str, Any]:
    with Cluster(f"scale-{agents}", protocol) as c:
        market = c.room_market("--max-per-address", "10000", "--max-connections", "10000")
        base = await probe(c, n_probe)
        rss0 = rss_mb(market.pid)
        connect_time = await swarm(c, agents, procs, 900)
        await asyncio.sleep(5)  # heartbeats and churn settle into their rhythm
        status = await asyncio.to_thread(c.status)
        connected = status["connections"]
        cpu0, w0 = cpu_seconds(market.pid), time.monotonic()
        await asyncio.sleep(5)  # the market's CPU with the swarm alone
        cpu_idle = (cpu_seconds(market.pid) - cpu0) / (time.monotonic() - w0)
        cpu0, w0 = cpu_seconds(market.pid), time.monotonic()
        loaded = await probe(c, n_probe)
        cpu = (cpu_seconds(market.pid) - cpu0) / (time.monotonic() - w0)
        rss1 = rss_mb(market.pid)
    return {
        "base": base,
        "loaded": loaded,
        "rss0": rss0,
        "rss1": rss1,
        "cpu": cpu,
        "cpu_swarm": cpu_idle,
        "connect_time": connect_time,
        "connections": connected,
    }


async def run(quick: bool) -> Section:
    agents = 200 if quick else 1000
    n_probe = 30 if quick else 100
    data = {f"v{p}": await measure(p, agents, n_probe) for p in PROTOCOLS}
    d2, d3 = data["v2"], data["v3"]

    def both(f: Callable[[dict[str, Any]], str]) -> list[str]:
        return [f(d2), f(d3)]

    rows = [
        ["connections (+2 probes)", *both(lambda d: str(d["connections"]))],
        ["connecting them all s", *both(lambda d: f"{d['connect_time']:.0f}")],
        [
            "market memory (RSS) MiB, empty → loaded",
            *both(lambda d: f"{d['rss0']:.0f} → {d['rss1']:.0f}"),
        ],
        ["market CPU, swarm alone", *both(lambda d: f"{d['cpu_swarm'] * 100:.0f} %")],
        ["market CPU, swarm + probes", *both(lambda d: f"{d['cpu'] * 100:.0f} %")],
        [
            "small update round trip p50 / p99 ms, empty market",
            *both(lambda d: f"{ms(d['base']['update_p50'])} / {ms(d['base']['update_p99'])}"),
        ],
        [
            f"small update round trip p50 / p99 ms, {agents} agents",
            *both(lambda d: f"{ms(d['loaded']['update_p50'])} / {ms(d['loaded']['update_p99'])}"),
        ],
        [
            "presence change seen p50 / p99 ms, empty market",
            *both(lambda d: f"{ms(d['base']['aware_p50'])} / {ms(d['base']['aware_p99'])}"),
        ],
        [
            f"presence change seen p50 / p99 ms, {agents} agents",
            *both(lambda d: f"{ms(d['loaded']['aware_p50'])} / {ms(d['loaded']['aware_p99'])}"),
        ],
    ]
    body = (
        f"{agents} light agents in 4 processes, heartbeat {HEARTBEAT:g} s (Igora's default), "
        f"{CHURN:g} agents replaced per second (leave + join). Protocol 2: y-websocket "
        "connections with an awareness state in the market's room, probes: two more agents "
        f"there, {n_probe} round trips of a small document update and {n_probe} awareness "
        "changes. Protocol 3: `Session`s in a `--v3-room`, each its own identity, reading "
        "nothing; probes: A writes a ping into `a/A`, B subscribed to it answers in `w/B`, "
        "A subscribed to it (the round trip); then A changes its presence name and B, "
        "subscribed to `who`, times until `who` shows it. Market CPU: over 5 s with the "
        "swarm alone, then over the probes; `inf`: a protocol 2 probe gave up (a round trip "
        "not back within 10 s, an awareness change not seen within 60 s).\n\n"
        + table(["measure", "protocol 2", "protocol 3"], rows)
    )
    issue19: dict[str, list[Target]] = {}
    for p, d in data.items():
        lo = d["loaded"]
        issue19[p] = [
            Target(
                f"{p}, {agents} agents + churn: update round trip p50",
                "≤ 20 ms",
                f"{ms(lo['update_p50'])} ms",
                lo["update_p50"] <= 0.020,
                19,
            ),
            Target(
                f"{p}, {agents} agents + churn: presence change seen p50"
                + (" (awareness)" if p == "v2" else " (`who`)"),
                "≤ 100 ms",
                f"{ms(lo['aware_p50'])} ms",
                lo["aware_p50"] <= 0.100,
                19,
            ),
            Target(
                f"{p}, {agents} agents + churn: market CPU",
                "≤ 30 % of a core",
                f"{d['cpu'] * 100:.0f} % (swarm alone {d['cpu_swarm'] * 100:.0f} %)",
                d["cpu"] <= 0.30,
                19,
            ),
        ]
    targets = [against_v2(new, old) for new, old in zip(issue19["v3"], issue19["v2"], strict=True)]
    crowd_n = 500 if quick else 5000
    crowds = {f"v{p}": await crowd(p, crowd_n, 120 if p == 2 else 600) for p in PROTOCOLS}
    data["crowd"] = crowds

    def served(d: dict[str, Any]) -> str:
        if not d["connected"]:
            return f"not all connected within the patience (connections: {d['connections']})"
        return (
            f"{d['connections']} connections in {d['connect_time']:.0f} s, market RSS "
            f"{d['rss']:.0f} MiB; then {d['tasks_s']:.0f} tasks/s, p50 {ms(d['p50'])} ms, "
            f"{int(d['errors'])} errors"
        )

    body += (
        f"\n\n{crowd_n:,} agents (same swarm) connect, then a broker, one echo worker (4 "
        "slots) and 10 clients in closed loops for 5 s (patience: 120 s for protocol 2, "
        "600 s for protocol 3):\n\n"
        + table(["protocol", "what happened"], [[p, served(d)] for p, d in crowds.items()])
    )
    c3 = crowds["v3"]
    targets.append(
        Target(
            f"v3: {crowd_n:,} agents connect and serve tasks",
            "all connect, tasks served, no errors",
            served(c3),
            bool(c3["connected"]) and c3.get("n", 0) > 0 and c3.get("errors", 1) == 0,
            19,
        )
    )
    return Section(f"Scale: one market, {agents} agents", body, targets, data)
