"""Private prompts' cost (issue 15): time to first token and tasks/s in a secure v3 room
(prompt and answer encrypted end to end) against an open v2 room, in the same run.

One market serves both rooms: the open room ``market`` (protocol 2) and the v3 room
``secure`` (``--v3-room``); each has its own broker and one echo worker (4 slots), each
agent of the v3 room with its own identity. One ``Client`` per room in this process.
TTFT: sequential prompts, alternating between the rooms. Tasks/s: closed loops on one
connection (the next prompt as soon as the answer is in), one room after the other.
"""

from __future__ import annotations

import asyncio
import os
import time

from igora import Client

from .common import Cluster, Section, Target, ms, pct, table
from .overhead import interleaved, market_ttft

NAME = "secure"
ROOM = "secure"


async def loops(client: Client, n: int, duration: float) -> float:
    """Tasks/s of ``n`` closed loops on ``client`` over ``duration`` seconds."""
    done = 0
    end = time.monotonic() + duration

    async def loop(k: int) -> None:
        nonlocal done
        i = 0
        while time.monotonic() < end:
            await client.chat(f"loop {k} prompt {i}", max_tokens=16)
            if time.monotonic() <= end:
                done += 1
            i += 1

    start = time.monotonic()
    await asyncio.gather(*(loop(k) for k in range(n)))
    return done / max(time.monotonic() - start, duration)


async def run(quick: bool) -> Section:
    n, duration, concurrent = (40, 3.0, 8) if quick else (200, 8.0, 16)
    load_before = os.getloadavg()
    with Cluster("secure") as c:
        c.market("--v3-room", ROOM)
        c.broker(name="b-open")
        c.worker("--slots", "4", name="w-open")
        c.broker("--room", ROOM, name="b-secure", data=True)
        c.worker("--room", ROOM, "--slots", "4", name="w-secure", data=True)
        await c.wait_agents_async("worker", 2, timeout=120)
        await c.wait_agents_async("broker", 2, timeout=120)
        os.environ["IGORA_DATA"] = c.agent_data("asker")["IGORA_DATA"]  # the v3 identity
        async with (
            Client(c.url, name="bench-open") as open_,
            Client(c.url, ROOM, name="bench-secure", timeout=60) as secure,
        ):
            await open_.wait_for_worker(None, 30)
            await secure.wait_for_worker(None, 30)
            t_open, t_secure = await interleaved(
                lambda i: market_ttft(open_, f"ttft {i}"),
                lambda i: market_ttft(secure, f"ttft {i}"),
                n,
            )
            await loops(open_, concurrent, 1.0)  # warm-up
            await loops(secure, concurrent, 1.0)
            r_open = await loops(open_, concurrent, duration)
            r_secure = await loops(secure, concurrent, duration)
    load_after = os.getloadavg()
    o50, o99, s50, s99 = (pct(t_open, 50), pct(t_open, 99), pct(t_secure, 50), pct(t_secure, 99))
    data = {
        "ttft_open_p50": o50,
        "ttft_open_p99": o99,
        "ttft_secure_p50": s50,
        "ttft_secure_p99": s99,
        "tasks_s_open": r_open,
        "tasks_s_secure": r_secure,
        "n": n,
        "loops": concurrent,
        "duration": duration,
        "load_before": load_before,
        "load_after": load_after,
    }
    body = (
        f"{n} sequential prompts per room, alternating (TTFT: the call to the first text "
        f"piece in hand); then {concurrent} closed loops on one connection for "
        f"{duration:g} s per room (after 1 s of warm-up each). Echo worker, 4 slots, one "
        "per room. The secure room's asker makes a task key per task, seals the prompt, "
        "grants the key to the worker (sealed box) and opens each chunk; the worker opens "
        "grant and prompt and seals each chunk (docs/security.md §6). Load average "
        f"(1 min) before and after: {load_before[0]:.2f}, {load_after[0]:.2f}.\n\n"
        + table(
            ["room", "TTFT p50 ms", "TTFT p99 ms", f"tasks/s ({concurrent} loops)"],
            [
                ["open (protocol 2)", ms(o50), ms(o99), f"{r_open:.0f}"],
                ["secure (protocol 3, encrypted)", ms(s50), ms(s99), f"{r_secure:.0f}"],
            ],
        )
    )
    added = s50 - o50
    targets = [
        Target(
            "TTFT added by a secure room, p50 (echo; issue 15)",
            "≤ 5 ms",
            f"{added * 1000:.2f} ms ({ms(s50)} against {ms(o50)} open)",
            added <= 0.005,
            15,
        ),
        Target(
            "Tasks/s of a secure room against an open one (echo; issue 15 asks for the "
            "figure, the 80 % is this project's target)",
            "≥ 80 % of open",
            f"{r_secure:.0f} against {r_open:.0f} ({r_secure / r_open:.0%})",
            r_secure >= 0.8 * r_open,
            15,
        ),
    ]
    return Section("Secure room against open room (issue 15)", body, targets, data)
