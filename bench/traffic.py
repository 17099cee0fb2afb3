"""Traffic by role (issue #19): bytes each agent receives from the market per task, as
askers are added, protocol 2 against protocol 3.

One market, one broker and one echo worker (16 slots), each connected through a
counting TCP proxy (``bench.proxy``: websocket framing included), one measured asker in
this process through a proxy too, and K - 1 more askers in two load processes
(``bench.load``), every asker in a closed loop, all starting together. The window runs
from one answer of the measured asker to another: its first after the load processes'
START, and the first at least ``duration`` later once it has had ``MIN_OWN`` answers
since (the others ask on meanwhile, for at most ``BOUND`` s past the window's planned
end). The proxies' counts at those two answers give the bytes the market sent each
measured agent: the asker's are divided by its own answers in the window (whole tasks:
it had none in flight at either end), the broker's and the worker's by all the answers
of the window (the one worker serves them all). With traffic scoped to those who act on
it, each figure stays constant as askers are added; when every agent reads the whole
room, the asker's grows with them.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

from igora import Client

from .common import PROTOCOLS, Cluster, Section, Target, against_v2, table
from .proxy import CountingProxy

NAME = "traffic"
ROLES = ("asker", "worker", "broker")
MIN_OWN = 5
"""The measured asker's own answers in the window, at least (its figure is per those)."""
BOUND = 60.0
"""Seconds past ``duration`` the window may run while waiting for them."""


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
            others = askers - 1  # in two load processes (bytes, not speed: two suffice)
            shares = [n for n in (others - others // 2, others // 2) if n > 0]
            outs = [c.dir / f"load-{i}.json" for i in range(len(shares))]
            loads = [
                c.spawn(
                    c.url,
                    str(n),
                    str(start),
                    str(duration + BOUND),  # ended with SIGUSR1 when the window closes
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
            # at each of the measured asker's answers: when, and the bytes each role had
            # received; the window runs from marks[first] to marks[-1]
            marks: list[tuple[float, int, int, int]] = []
            first: int | None = None
            try:
                await client.wait_for_worker(None, 60)
                if time.time() > start:
                    raise RuntimeError(
                        f"the measured asker connected {time.time() - start:.1f} s late"
                    )
                # with the others, from their warm-up on: had it asked alone while they
                # connected, the broker (fairness: fewest tasks served in the last minute
                # first) would serve it last of 100 for up to a minute
                await asyncio.sleep(max(0.0, start - 1.0 - time.time()))
                n = 0
                while time.time() < end + BOUND:
                    text = await client.chat(f"measured {n}")
                    assert text == f"Echo: measured {n}", text
                    n += 1
                    marks.append((time.time(), ap.down, wp.down, bp.down))
                    if first is None and marks[-1][0] >= start:
                        first = len(marks) - 1
                    elif (
                        first is not None
                        and marks[-1][0] - marks[first][0] >= duration
                        and n - 1 - first >= MIN_OWN
                    ):
                        break
            finally:
                await client.close()
            for load in loads:
                load.send(signal.SIGUSR1)
            ends = [t for t, *_ in marks]
            for load, out in zip(loads, outs, strict=True):
                while load.poll() is None:
                    await asyncio.sleep(0.2)
                ends += [t1 for _, t1 in json.loads(out.read_text())["done"]]
    if first is None or first == len(marks) - 1:
        raise RuntimeError(f"the measured asker had no answer within {duration + BOUND:g} s")
    (t0, *at0), (t1, *at1) = marks[first], marks[-1]
    mine = len(marks) - 1 - first
    total = sum(1 for t in ends if t0 < t <= t1)
    if loads and total == mine:
        raise RuntimeError(f"the other {askers - 1} askers answered nothing in the window")
    got = dict(zip(ROLES, (b - a for a, b in zip(at0, at1, strict=True)), strict=True))
    per = {role: got[role] / (mine if role == "asker" else total) for role in ROLES}
    return {**per, "tasks": total, "mine": mine, "window": t1 - t0}


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
            + [f"{int(r2[key])} / {int(r3[key])}" for key in ("mine", "tasks")]
            + [f"{r2['window']:.1f} / {r3['window']:.1f}"]
        )
    body = (
        "Bytes the market sent each agent per task (v2 / v3) with K askers in closed loops "
        "(all starting together), one broker and one echo worker (16 slots). The window "
        "runs from one answer of the measured asker to another, at least "
        f"{duration:g} s apart and {MIN_OWN} of its answers apart (at most {BOUND:g} s "
        "more): the asker's bytes are per answer of its own in the window (whole tasks: "
        "none in flight at either end), the broker's and the worker's per answer of the "
        "whole market in the same window. The measured asker starts with the others: "
        "asking alone while they connected (as this topic did before), it had been served "
        "most in the last minute, and the broker's fairness (fewest served lately first, "
        "a task moving up a class per 10 s of waiting) served it after the 99 others, "
        "whose closed loops kept the queue full: no task of its own ended in 10 s.\n\n"
        + table(
            [
                "askers",
                "asker B/task v2 / v3",
                "worker B/task",
                "broker B/task",
                "asker's tasks v2 / v3",
                "all tasks v2 / v3",
                "window s v2 / v3",
            ],
            rows,
        )
    )
    issue19: dict[int, Target] = {}
    for protocol in PROTOCOLS:
        growth = {
            role: results[f"v{protocol}-{sizes[-1]}"][role] / results[f"v{protocol}-1"][role]
            for role in ROLES
        }
        worst = max(growth, key=lambda role: growth[role])
        issue19[protocol] = Target(
            f"v{protocol}: bytes received per agent per task, 1 → {sizes[-1]} askers",
            "constant (growth ≤ 1.5 ×)",
            ", ".join(f"{role} × {growth[role]:.2f}" for role in ROLES) + f" (worst: {worst})",
            growth[worst] <= 1.5,
            19,
        )
    targets = [against_v2(issue19[3], issue19[2])]
    return Section("Traffic by role: bytes received per task", body, targets, results)
