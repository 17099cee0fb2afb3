"""The shared document itself (issues #2 and #8): round trip of a small update between
two agents, small updates per second through one room, and the time a newcomer takes to
sync a room, against the room's size and against the number of tasks done.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pycrdt import Map

from igora import Client
from igora.agent import Agent
from igora.config import MarketAddress
from igora.protocol import MapName, State, TaskField, new_id, now_ms

from .common import Cluster, Section, Target, ms, pct, table

NAME = "sync"


def _agent(url: str, room: str, name: str) -> Agent:
    return Agent(
        MarketAddress(url, room), type="client", name=name, style="text", connect_timeout=120
    )


async def round_trips(
    url: str, n: int, room: str = "bench-rtt", url_b: str | None = None
) -> list[float]:
    """A writes ping i; B answers pong i; A times the round trip. With ``url_b``, B is on
    that market (another replica of A's)."""
    a, b = _agent(url, room, "a"), _agent(url_b or url, room, "b")
    await a.start()
    await b.start()
    ma, mb = a.doc.get("bench", type=Map), b.doc.get("bench", type=Map)
    got: asyncio.Queue[int] = asyncio.Queue()

    def on_b(event: Any) -> None:
        ping = event.keys.get("ping")
        if ping and ping.get("newValue") is not None:
            value = ping["newValue"]

            def answer() -> None:
                with b.transaction():
                    mb["pong"] = value

            asyncio.get_running_loop().call_soon(answer)  # no writes inside an observer

    def on_a(event: Any) -> None:
        pong = event.keys.get("pong")
        if pong and pong.get("newValue") is not None:
            got.put_nowait(int(pong["newValue"]))

    mb.observe(on_b)
    ma.observe(on_a)
    out = []
    for i in range(n + 10):
        t0 = time.perf_counter()
        with a.transaction():
            ma["ping"] = i
        while await asyncio.wait_for(got.get(), 10) != i:
            pass
        if i >= 10:
            out.append(time.perf_counter() - t0)
    await a.stop()
    await b.stop()
    return out


async def updates_per_second(url: str, n: int) -> float:
    a, b = _agent(url, "bench-rate", "a"), _agent(url, "bench-rate", "b")
    await a.start()
    await b.start()
    ma, mb = a.doc.get("bench", type=Map), b.doc.get("bench", type=Map)
    done = asyncio.Event()

    def on_b(event: Any) -> None:
        if mb.get("k") == n - 1:
            done.set()

    mb.observe(on_b)
    t0 = time.perf_counter()
    for i in range(n):
        with a.transaction():
            ma["k"] = i
        if i % 50 == 49:
            await asyncio.sleep(0)
    await asyncio.wait_for(done.wait(), 120)
    rate = n / (time.perf_counter() - t0)
    await a.stop()
    await b.stop()
    return rate


async def newcomer_sync(url: str, room: str, repeat: int = 5) -> tuple[float, int]:
    """Median time from a new agent's start to its document synced, and the doc size."""
    times = []
    size = 0
    for _ in range(repeat):
        ag = _agent(url, room, "newcomer")
        t0 = time.perf_counter()
        await ag.start()
        times.append(time.perf_counter() - t0)
        size = len(ag.doc.get_update())
        await ag.stop()
    return pct(times, 50), size


def _task(i: int) -> dict[str, Any]:
    tid = new_id()
    return {
        TaskField.ID: tid,
        TaskField.ASKER: new_id(),
        TaskField.STYLE: "text",
        TaskField.STATE: State.DONE.value,
        TaskField.PROMPT: f"question number {i}",
        TaskField.RESPONSE: f"Echo: question number {i}",
        TaskField.DATE: now_ms(),
        TaskField.END: now_ms(),
        TaskField.WORKER: new_id(),
        TaskField.ATTEMPTS: 1,
    }


async def fill(url: str, room: str, n: int) -> None:
    ag = _agent(url, room, "filler")
    await ag.start()
    done = ag.maps[MapName.DONE]
    for start in range(0, n, 1000):
        with ag.transaction():
            for i in range(start, min(n, start + 1000)):
                t = _task(i)
                done[t[TaskField.ID]] = t
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)
    await ag.stop()


async def tasks_done_sync(c: Cluster, checkpoints: list[int]) -> list[dict[str, float]]:
    """Run echo tasks end to end and measure a newcomer's sync at each checkpoint: 1 s
    after the flow stops (what the market's compaction has not collected yet is still
    there), then once two more compactions ran (the room settled)."""
    out = []
    done = 0
    async with Client(c.url, name="bench-sync-load") as client:
        await client.wait_for_worker(None, 60)
        busy = 0.0
        for target in checkpoints:

            async def worker(k: int, target: int = target) -> None:
                nonlocal done
                while done < target:
                    done += 1
                    await client.chat(f"task {k} {done}")

            t_start = time.perf_counter()
            await asyncio.gather(*(worker(k) for k in range(32)))
            busy += time.perf_counter() - t_start
            rate = done / busy
            await asyncio.sleep(1.0)
            t, size = await newcomer_sync(c.url, "market")
            before = c.compactions("market")
            deadline = time.monotonic() + 30
            while c.compactions("market") < before + 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            settled_t, settled_size = await newcomer_sync(c.url, "market")
            out.append(
                {
                    "tasks": done,
                    "sync": t,
                    "size": size,
                    "rate": rate,
                    "settled_sync": settled_t,
                    "settled_size": settled_size,
                    "compactions": c.compactions("market"),
                }
            )
    return out


async def run(quick: bool) -> Section:
    rows_size = []
    targets = []
    data: dict[str, Any] = {}
    with Cluster("sync") as c:
        c.market()
        rtt = await round_trips(c.url, 100 if quick else 500)
        rate = await updates_per_second(c.url, 2000 if quick else 10000)
        sizes = [0, 1000, 10_000] if quick else [0, 1000, 10_000, 100_000]
        for n in sizes:
            room = f"bench-size-{n}"
            if n:
                await fill(c.url, room, n)
            t, size = await newcomer_sync(c.url, room)
            rows_size.append([f"{n:,}", f"{size / 1024:.0f}", ms(t)])
            data[f"size_{n}"] = {"sync": t, "bytes": size}
    data["rtt_p50"], data["rtt_p99"], data["rate"] = pct(rtt, 50), pct(rtt, 99), rate
    checkpoints = [1000] if quick else [1000, 5_000, 10_000]
    with Cluster("sync-tasks") as c:
        c.market()
        c.broker()
        c.worker("--slots", "8")
        await c.wait_agents_async("worker", 1, timeout=120)
        await c.wait_agents_async("broker", 1, timeout=120)
        t0 = await newcomer_sync(c.url, "market")
        tasks = [
            {
                "tasks": 0,
                "sync": t0[0],
                "size": t0[1],
                "rate": 0.0,
                "settled_sync": t0[0],
                "settled_size": t0[1],
                "compactions": 0,
            }
        ]
        tasks += await tasks_done_sync(c, checkpoints)
    data["tasks"] = tasks
    rows_tasks = [
        [
            f"{r['tasks']:,}",
            f"{r['size'] / 1024:.1f}",
            ms(r["sync"]),
            f"{r['settled_size'] / 1024:.1f}",
            ms(r["settled_sync"]),
            str(r["compactions"]),
        ]
        for r in tasks
    ]
    last = tasks[-1]
    targets.append(
        Target(
            f"Newcomer sync after {last['tasks']:,} finished tasks",
            "≤ 50 ms",
            f"{last['sync'] * 1000:.1f} ms ({last['size'] / 1024:.0f} KiB)",
            last["sync"] <= 0.050,
        )
    )
    body = (
        "Two agents in the benchmark process on one market (with its store). A writes a "
        "small value, B answers, A sees the answer: round trip of a small update.\n\n"
        + table(
            ["measure", "value"],
            [
                ["small update round trip p50", f"{ms(pct(rtt, 50))} ms"],
                ["small update round trip p99", f"{ms(pct(rtt, 99))} ms"],
                ["small updates per second through one room (A → B)", f"{rate:,.0f}"],
            ],
        )
        + "\n\nNewcomer sync (connect, handshake, sync step 1 and 2) against the room's size "
        "(entries of ~300 bytes in `done`), median of 5:\n\n"
        + table(["entries", "document KiB", "sync ms"], rows_size)
        + "\n\nNewcomer sync against tasks done end to end (echo worker, 32 tasks in flight, "
        "tasks read by their client, so they leave `done` at once: what remains is Yjs "
        "history until the market's compaction collects it, every 500 tasks and after a 2 s "
        "pause, see docs/faults.md). Measured 1 s after the flow stops, then once the room "
        "settled (two more compactions):\n\n"
        + table(
            [
                "tasks done",
                "document KiB",
                "sync ms",
                "settled KiB",
                "settled sync ms",
                "compactions so far",
            ],
            rows_tasks,
        )
    )
    return Section("Shared document: round trip, update rate, newcomer sync", body, targets, data)
