"""Task throughput end to end (issues #8 and #19): tasks/s with 1, 4 and 16 deterministic
workers and 1, 10 and 100 concurrent clients, protocol 2 against protocol 3.

Each concurrent client is its own ``Client`` (its own market connection) asking short
echo prompts in a closed loop (the next as soon as the answer is in); clients run in two
load processes (``bench.load``), workers are ``igora worker --engine echo`` processes, one
market (with its store) and one broker. Tasks/s counts the answers that came in
during the measurement window (a round trip longer than the window still counts once).

A second set of cells has the same 100 closed loops share ONE ``Client`` connection, as
a gateway does for its users: every agent of the room applies every update, so 100
connections cost 100 times the reading of each update, one connection once.

A closed loop measures the queue, not the task: with K loops, latency ≥ K ÷ tasks/s
(Little's law). A third set measures what K participants cost each task below
saturation: K clients with their own connections in an OPEN loop, each asking once every
``EVERY`` seconds whether answered or not (K ÷ EVERY tasks/s offered), against 1 client at
the same pace.
"""

from __future__ import annotations

import asyncio
import json
import time

from .common import (
    PROTOCOLS,
    Cluster,
    Section,
    Target,
    against_v2,
    cpu_seconds,
    load_processes,
    ms,
    pct,
    table,
)

NAME = "throughput"
EVERY = 4.0
"""Seconds between two tasks of one client in the open loop: 100 clients offer 25 tasks/s,
under protocol 3's closed-loop tasks/s with 100 clients on the shared 2-core machine
(34-63 with a load average of 10-18, 105-296 with 5-11), not always under protocol 2's
(10-70: every connection reads every task)."""
REFERENCE_TASKS = 5
"""Tasks of the one client at that pace (its window: ``REFERENCE_TASKS × EVERY``)."""


async def one(
    c: Cluster,
    mains: tuple[int, int],
    clients: int,
    duration: float,
    shared: bool = False,
    every: float | None = None,
) -> dict[str, float]:
    """One cell: ``clients`` closed loops, or with ``every`` open loops at that pace;
    ``mains``: the market's and the broker's pids, whose main threads' CPU is measured."""
    procs = 1 if shared else load_processes(clients)
    share = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    # protocol 3 clients connect one after the other (each reads its own identity)
    per_client = 0.06 if c.protocol == 2 else 0.3
    start = time.time() + 3.0 + (0.0 if shared else per_client * clients)
    outs = []
    loads = []
    for i, k in enumerate(share):
        tag = f"load-{clients}-{i}{'-shared' if shared else ''}{'-open' if every else ''}"
        out = c.dir / f"{tag}.json"
        outs.append(out)
        loads.append(
            c.spawn(
                c.url,
                str(k),
                # open loop: the second process's clients between the first's
                str(start + (every * i / clients if every else 0.0)),
                str(duration),
                str(out),
                *(["--shared"] if shared else []),
                *(["--every", str(every)] if every else []),
                *c.load_args(tag),
                name=f"load{clients}-{i}",
                module="bench.load",
            )
        )
    threads = asyncio.create_task(_main_threads(mains, start, duration))
    for p in loads:
        while p.poll() is None:
            await asyncio.sleep(0.2)
    market_cpu, broker_cpu = await threads
    lat: list[float] = []
    answered = 0
    errors = 0
    late = 0.0
    for out in outs:
        r = json.loads(out.read_text())
        answers = [(t0, t1) for t0, t1 in r["done"] if start <= t1 <= start + duration]
        answered += len(answers)
        # closed loop: the answers that came in during the window, however long ago they
        # were asked; open loop: the tasks due in the window, however late answered
        timed = [(t0, t1) for t0, t1 in r["done"] if start <= t0 < start + duration]
        lat += [t1 - t0 for t0, t1 in (timed if every else answers)]
        errors += r["errors"]
        late = max(late, r["late"])
    return {
        "tasks_s": answered / duration,
        "p50": pct(lat, 50),
        "p99": pct(lat, 99),
        "errors": errors,
        "n": len(lat),
        "late": late,  # s the slowest load process connected after the window opened
        # CPU of the one-thread roles per answer in the window (ms)
        "market_ms": 1000 * market_cpu / answered if answered else float("nan"),
        "broker_ms": 1000 * broker_cpu / answered if answered else float("nan"),
    }


async def _main_threads(pids: tuple[int, int], start: float, duration: float) -> list[float]:
    """CPU seconds the main thread of each of ``pids`` spent in the window."""
    await asyncio.sleep(max(0.0, start - time.time()))
    before = [cpu_seconds(p, p) for p in pids]
    await asyncio.sleep(duration)
    return [cpu_seconds(p, p) - b for p, b in zip(pids, before, strict=True)]


async def grid(
    protocol: int,
    w: int,
    client_counts: tuple[int, ...],
    duration: float,
    shared_loops: int,
    open_clients: int,
    open_window: float,
) -> dict[str, dict[str, float]]:
    """The cells of ``w`` workers in one cluster: each count of clients with its own
    connection, then ``shared_loops`` loops on one connection, then ``open_clients`` and 1
    client in an open loop (keys ``WxK``, ``WxK-on-1``, ``WxK-open``)."""
    out = {}
    with Cluster(f"throughput-{w}", protocol) as c:
        mains = (c.room_market().pid, c.room_broker().pid)
        for i in range(w):
            c.room_worker("--slots", "4", name=f"w{i}")
        await c.wait_agents_async("worker", w, timeout=180)
        await c.wait_agents_async("broker", 1, timeout=180)
        for k in client_counts:
            out[f"{w}x{k}"] = await one(c, mains, k, duration)
        out[f"{w}x{shared_loops}-on-1"] = await one(c, mains, shared_loops, duration, shared=True)
        out[f"{w}x{open_clients}-open"] = await one(
            c, mains, open_clients, open_window, every=EVERY
        )
        out[f"{w}x1-open"] = await one(c, mains, 1, REFERENCE_TASKS * EVERY, every=EVERY)
    return out


def row(w: int, k: int, r2: dict[str, float], r3: dict[str, float]) -> list[object]:
    ratio = r3["tasks_s"] / r2["tasks_s"] if r2["tasks_s"] else float("nan")
    return [
        w,
        k,
        f"{r2['tasks_s']:.0f}",
        f"{r3['tasks_s']:.0f}",
        f"{ratio:.2f}",
        f"{ms(r2['p50'])} / {ms(r3['p50'])}",
        f"{ms(r2['p99'])} / {ms(r3['p99'])}",
        f"{int(r2['errors'])} / {int(r3['errors'])}",
    ]


def ceiling_row(w: int, r2: dict[str, float], r3: dict[str, float]) -> list[object]:
    """A cell's one-thread roles: CPU per answer, and 1 ÷ the larger of the two."""

    def ceiling(r: dict[str, float]) -> str:
        return f"{1000 / max(r['market_ms'], r['broker_ms']):.0f}"

    return [
        w,
        f"{r2['market_ms']:.2f} / {r3['market_ms']:.2f}",
        f"{r2['broker_ms']:.2f} / {r3['broker_ms']:.2f}",
        f"{ceiling(r2)} / {ceiling(r3)}",
    ]


def cost(res: dict[str, dict[str, float]], w: int, k: int) -> float:
    """p50 of ``k`` open-loop clients ÷ p50 of 1 client at the same pace, ``w`` workers."""
    return res[f"{w}x{k}-open"]["p50"] / res[f"{w}x1-open"]["p50"]


HEADER = [
    "workers",
    "clients",
    "v2 tasks/s",
    "v3 tasks/s",
    "v3 ÷ v2",
    "p50 ms v2 / v3",
    "p99 ms v2 / v3",
    "errors v2 / v3",
]


async def run(quick: bool) -> Section:
    duration = 3.0 if quick else 5.0
    worker_counts = (1, 4) if quick else (1, 4, 16)
    client_counts = (1, 10) if quick else (1, 10, 100)
    shared_loops = 20 if quick else 100
    open_clients, open_window = (20, 8.0) if quick else (100, 12.0)
    offered = open_clients / EVERY
    results: dict[int, dict[str, dict[str, float]]] = {p: {} for p in PROTOCOLS}
    for w in worker_counts:
        for protocol in PROTOCOLS:  # back to back, each its own cluster
            results[protocol].update(
                await grid(
                    protocol, w, client_counts, duration, shared_loops, open_clients, open_window
                )
            )
    v2, v3 = results[2], results[3]
    rows = [row(w, k, v2[f"{w}x{k}"], v3[f"{w}x{k}"]) for w in worker_counts for k in client_counts]
    shared_rows = [
        row(w, shared_loops, v2[f"{w}x{shared_loops}-on-1"], v3[f"{w}x{shared_loops}-on-1"])
        for w in worker_counts
    ]
    body = (
        f"Window of {duration:g} s per cell (after 1 s of warm-up); each worker has 4 slots; "
        "tasks/s = answers that came in during the window; latency = submit to final "
        "answer, of those answers. Protocol 2 (the original room) and protocol 3 "
        "(a `--v3-room`, every agent with its own identity) measured back to back for each "
        "count of workers, each in its own cluster (market, one broker, the workers).\n\n"
        "Closed loop (each client asks again as soon as its answer is in: tasks/s at "
        "saturation), each concurrent client with its own connection (each its own "
        "`Client`, in two load processes, or one per two cores on a larger machine):\n\n"
        + table(HEADER, rows)
        + f"\n\n{shared_loops} concurrent askers sharing ONE connection (one `Client`, "
        f"{shared_loops} tasks in flight, as a gateway serves its users):\n\n"
        + table(HEADER, shared_rows)
        + f"\n\nThe two roles that run as one thread each, in the closed-loop cells of "
        f"{client_counts[-1]} clients: CPU per answer of the market's event loop and of the "
        "broker (their main threads during the window, from `/proc`). Every other role "
        "spreads over processes (the workers, the load processes), so on a machine with "
        "cores to spare a cell cannot pass 1 ÷ the larger of the two (*ceiling*); on a "
        "machine whose cores all the processes share, the total CPU per task decides "
        "first.\n\n"
        + table(
            ["workers", "market loop ms v2 / v3", "broker ms v2 / v3", "ceiling tasks/s v2 / v3"],
            [
                ceiling_row(w, v2[f"{w}x{client_counts[-1]}"], v3[f"{w}x{client_counts[-1]}"])
                for w in worker_counts
            ],
        )
    )
    open_rows = [
        [
            w,
            k,
            f"{k / EVERY:g}",
            " / ".join(f"{res[f'{w}x{k}-open']['tasks_s']:.3g}" for res in (v2, v3)),
            " / ".join(ms(res[f"{w}x{k}-open"]["p50"]) for res in (v2, v3)),
            " / ".join(ms(res[f"{w}x{k}-open"]["p99"]) for res in (v2, v3)),
            " / ".join(f"{cost(res, w, k):.2f}" for res in (v2, v3)),
            " / ".join(str(int(res[f"{w}x{k}-open"]["errors"])) for res in (v2, v3)),
        ]
        for w in worker_counts
        for k in (1, open_clients)
    ]
    body += (
        f"\n\nA closed loop measures the queue: with K loops each asking again at once, "
        f"latency ≥ K ÷ tasks/s (Little's law), so the {client_counts[-1]}-client rows above "
        "show saturation, not what each task costs. Open loop: each client (its own "
        f"connection, in the same load processes) asks once every {EVERY:g} s whether answered "
        f"or not, the clients' first tasks spread evenly over the {EVERY:g} s, so "
        f"{open_clients} clients offer {offered:g} tasks/s; latency = from when a task was "
        "due to its answer, of every task due in the window (however late answered); "
        f"window {open_window:g} s ({REFERENCE_TASKS * EVERY:g} s for 1 client: "
        f"{REFERENCE_TASKS} tasks). *÷ 1 client* = p50 ÷ the p50 of 1 client at the same pace "
        "in the same cluster: what the other participants cost each task. Answers/s below "
        "the offered rate: the room could not keep up (compare the closed-loop tasks/s "
        "above).\n\n"
        + table(
            [
                "workers",
                "clients",
                "offered tasks/s",
                "answers/s v2 / v3",
                "p50 ms v2 / v3",
                "p99 ms v2 / v3",
                "p50 ÷ 1 client v2 / v3",
                "errors v2 / v3",
            ],
            open_rows,
        )
    )
    late = [
        f"v{p} {k}: {r['late']:.1f} s"
        for p, res in results.items()
        for k, r in res.items()
        if r["late"] > 0
    ]
    if late:
        body += (
            "\n\nCells whose clients were still connecting when the window opened (their "
            "tasks/s count low): " + ", ".join(late) + "."
        )
    targets = []
    for protocol, res in results.items():
        own = [k for k in res if "-" not in k]
        one_conn = [k for k in res if k.endswith("-on-1")]
        best_own = max(own, key=lambda key: res[key]["tasks_s"])
        best_one = max(one_conn, key=lambda key: res[key]["tasks_s"])
        b_own, b_one = res[best_own]["tasks_s"], res[best_one]["tasks_s"]
        targets += [
            Target(
                f"Task throughput (echo, end to end), one connection per client, v{protocol}",
                "≥ 500 tasks/s",
                f"{b_own:.0f} tasks/s (best cell: {best_own.replace('x', ' workers × ')} clients)",
                b_own >= 500,
            ),
            Target(
                f"Task throughput (echo, end to end), {shared_loops} tasks on one connection, "
                f"v{protocol}",
                "≥ 500 tasks/s",
                f"{b_one:.0f} tasks/s (best cell: {best_one.split('x')[0]} workers)",
                b_one >= 500,
            ),
        ]
    w_max, k_max = worker_counts[-1], client_counts[-1]
    issue19: dict[int, list[Target]] = {}
    for protocol, res in results.items():
        own = [k for k in res if "-" not in k]
        best = max(own, key=lambda key: res[key]["tasks_s"])
        small, big = res["1x1"]["tasks_s"], res[f"{w_max}x{k_max}"]["tasks_s"]
        worst_p50 = max(res[f"{w}x{k_max}"]["p50"] for w in worker_counts)
        w_open = max(worker_counts, key=lambda w: res[f"{w}x{open_clients}-open"]["p50"])
        o, o1 = res[f"{w_open}x{open_clients}-open"], res[f"{w_open}x1-open"]
        issue19[protocol] = [
            Target(
                f"v{protocol}: {w_max} workers × {k_max} clients at least as fast as 1 × 1",
                "ratio ≥ 1",
                f"{big:.0f} ÷ {small:.0f} tasks/s = {big / small:.2f}",
                big >= small,
                19,
            ),
            Target(
                f"v{protocol}: best cell of the grid",
                "≥ 1,000 tasks/s",
                f"{res[best]['tasks_s']:.0f} tasks/s ({best.replace('x', ' × ')})",
                res[best]["tasks_s"] >= 1000,
                19,
            ),
            Target(
                f"v{protocol}: latency p50 with {open_clients} clients, open loop at "
                f"{offered:g} tasks/s offered (worst over the workers)",
                "≤ 50 ms",
                f"{ms(o['p50'])} ms ({w_open} workers, {o['tasks_s']:.1f} answers/s; 1 client "
                f"at the same pace: {ms(o1['p50'])} ms, × {cost(res, w_open, open_clients):.2f})",
                o["p50"] <= 0.050,
                19,
            ),
            Target(
                f"v{protocol}: latency p50 with {k_max} clients, closed loop (saturation: "
                "Little's law; worst over the workers)",
                "≤ 50 ms",
                f"{ms(worst_p50)} ms",
                worst_p50 <= 0.050,
                19,
            ),
        ]
    targets += [against_v2(new, old) for new, old in zip(issue19[3], issue19[2], strict=True)]
    return Section("Task throughput", body, targets, {f"v{p}": r for p, r in results.items()})
