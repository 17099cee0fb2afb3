"""Task throughput end to end (issue #8): tasks/s with 1, 4 and 16 deterministic workers
and 1, 10 and 100 concurrent clients.

Each concurrent client is its own ``Client`` (its own market connection) asking short
echo prompts in a closed loop (the next as soon as the answer is in); clients run in two
load processes (``bench.load``), workers are ``igora worker --engine echo`` processes, one
market (with its store) and one broker. Tasks/s counts answers whose whole round trip
fell inside the measurement window.
"""

from __future__ import annotations

import asyncio
import json
import time

from .common import Cluster, Section, Target, ms, pct, table

NAME = "throughput"


async def one(c: Cluster, clients: int, duration: float) -> dict[str, float]:
    procs = min(2, clients)
    share = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    start = time.time() + 3.0 + 0.06 * clients
    outs = []
    loads = []
    for i, k in enumerate(share):
        out = c.dir / f"load-{clients}-{i}.json"
        outs.append(out)
        loads.append(c.spawn(c.url, str(k), str(start), str(duration), str(out),
                             name=f"load{clients}-{i}", module="bench.load"))
    for p in loads:
        while p.poll() is None:
            await asyncio.sleep(0.2)
    lat: list[float] = []
    errors = 0
    for out in outs:
        r = json.loads(out.read_text())
        lat += r["latencies"]
        errors += r["errors"]
    return {"tasks_s": len(lat) / duration, "p50": pct(lat, 50), "p99": pct(lat, 99),
            "errors": errors, "n": len(lat)}


async def run(quick: bool) -> Section:
    duration = 4.0 if quick else 8.0
    worker_counts = (1, 4, 16)
    client_counts = (1, 10, 100)
    results: dict[str, dict[str, float]] = {}
    rows = []
    for w in worker_counts:
        with Cluster(f"throughput-{w}") as c:
            c.market()
            c.broker()
            for i in range(w):
                c.worker("--slots", "4", name=f"w{i}")
            await c.wait_agents("worker", w)
            await c.wait_agents("broker", 1)
            for k in client_counts:
                r = await one(c, k, duration)
                results[f"{w}x{k}"] = r
                rows.append([w, k, f"{r['tasks_s']:.0f}", ms(r["p50"]), ms(r["p99"]),
                             int(r["errors"])])
    best_key = max(results, key=lambda key: results[key]["tasks_s"])
    best = results[best_key]["tasks_s"]
    body = (
        f"Window of {duration:g} s per cell (after 1 s of warm-up); each worker has 4 slots; "
        "latency = submit to final answer.\n\n"
        + table(["workers", "concurrent clients", "tasks/s", "latency p50 ms",
                 "latency p99 ms", "errors"], rows)
    )
    target = Target("Task throughput (echo, end to end)", "≥ 500 tasks/s",
                    f"{best:.0f} tasks/s (best cell: {best_key.replace('x', ' workers × ')} clients)",
                    best >= 500)
    return Section("Task throughput", body, [target], results)
