"""Task throughput end to end (issue #8): tasks/s with 1, 4 and 16 deterministic workers
and 1, 10 and 100 concurrent clients.

Each concurrent client is its own ``Client`` (its own market connection) asking short
echo prompts in a closed loop (the next as soon as the answer is in); clients run in two
load processes (``bench.load``), workers are ``igora worker --engine echo`` processes, one
market (with its store) and one broker. Tasks/s counts answers whose whole round trip
fell inside the measurement window.

A second set of cells has the same 100 closed loops share ONE ``Client`` connection, as
a gateway does for its users: every agent of the room applies every update, so 100
connections cost 100 times the reading of each update, one connection once.
"""

from __future__ import annotations

import asyncio
import json
import time

from .common import Cluster, Section, Target, ms, pct, table

NAME = "throughput"


async def one(c: Cluster, clients: int, duration: float, shared: bool = False) -> dict[str, float]:
    procs = 1 if shared else min(2, clients)
    share = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    start = time.time() + 3.0 + (0.0 if shared else 0.06 * clients)
    outs = []
    loads = []
    for i, k in enumerate(share):
        out = c.dir / f"load-{clients}-{i}{'-shared' if shared else ''}.json"
        outs.append(out)
        loads.append(
            c.spawn(
                c.url,
                str(k),
                str(start),
                str(duration),
                str(out),
                *(["--shared"] if shared else []),
                name=f"load{clients}-{i}",
                module="bench.load",
            )
        )
    for p in loads:
        while p.poll() is None:
            await asyncio.sleep(0.2)
    lat: list[float] = []
    errors = 0
    for out in outs:
        r = json.loads(out.read_text())
        lat += r["latencies"]
        errors += r["errors"]
    return {
        "tasks_s": len(lat) / duration,
        "p50": pct(lat, 50),
        "p99": pct(lat, 99),
        "errors": errors,
        "n": len(lat),
    }


async def run(quick: bool) -> Section:
    duration = 4.0 if quick else 8.0
    worker_counts = (1, 4, 16)
    client_counts = (1, 10, 100)
    shared_loops = 100
    results: dict[str, dict[str, float]] = {}
    rows = []
    shared_rows = []
    for w in worker_counts:
        with Cluster(f"throughput-{w}") as c:
            c.market()
            c.broker()
            for i in range(w):
                c.worker("--slots", "4", name=f"w{i}")
            await c.wait_agents_async("worker", w, timeout=120)
            await c.wait_agents_async("broker", 1, timeout=120)
            for k in client_counts:
                r = await one(c, k, duration)
                results[f"{w}x{k}"] = r
                rows.append(
                    [w, k, f"{r['tasks_s']:.0f}", ms(r["p50"]), ms(r["p99"]), int(r["errors"])]
                )
            r = await one(c, shared_loops, duration, shared=True)
            results[f"{w}x{shared_loops}-on-1"] = r
            shared_rows.append(
                [
                    w,
                    shared_loops,
                    f"{r['tasks_s']:.0f}",
                    ms(r["p50"]),
                    ms(r["p99"]),
                    int(r["errors"]),
                ]
            )
    own = [k for k in results if not k.endswith("-on-1")]
    one_conn = [k for k in results if k.endswith("-on-1")]
    best_own = max(own, key=lambda key: results[key]["tasks_s"])
    best_one = max(one_conn, key=lambda key: results[key]["tasks_s"])
    body = (
        f"Window of {duration:g} s per cell (after 1 s of warm-up); each worker has 4 slots; "
        "latency = submit to final answer.\n\n"
        "Each concurrent client with its own connection (each its own `Client`, in two "
        "load processes):\n\n"
        + table(
            [
                "workers",
                "concurrent clients",
                "tasks/s",
                "latency p50 ms",
                "latency p99 ms",
                "errors",
            ],
            rows,
        )
        + f"\n\n{shared_loops} concurrent askers sharing ONE connection (one `Client`, "
        f"{shared_loops} tasks in flight, as a gateway serves its users):\n\n"
        + table(
            [
                "workers",
                "tasks in flight on 1 connection",
                "tasks/s",
                "latency p50 ms",
                "latency p99 ms",
                "errors",
            ],
            shared_rows,
        )
    )
    b_own, b_one = results[best_own]["tasks_s"], results[best_one]["tasks_s"]
    targets = [
        Target(
            "Task throughput (echo, end to end), one connection per client",
            "≥ 500 tasks/s",
            f"{b_own:.0f} tasks/s (best cell: {best_own.replace('x', ' workers × ')} clients)",
            b_own >= 500,
        ),
        Target(
            f"Task throughput (echo, end to end), {shared_loops} tasks on one connection",
            "≥ 500 tasks/s",
            f"{b_one:.0f} tasks/s (best cell: {best_one.split('x')[0]} workers)",
            b_one >= 500,
        ),
    ]
    return Section("Task throughput", body, targets, results)
