"""Soak (issue #17): 100,000 echo tasks through market, broker, two workers, the gateway
and a client process; the memory of every process must stay flat, no task may be lost or
run twice.

The client process (``python -m bench.soak URL GATEWAY N WARMUP OUT ROOM NAME=PID ...``, ROOM
``-`` for the market's default room) keeps one
``Client`` connected for the whole run and one HTTP connection pool to the gateway; half
the tasks go through each, half of each streamed. It samples the resident memory of the
processes named on its command line, and its own, when 10 %, 50 % and 100 % of the tasks
are answered, and writes the figures to OUT (JSON). The memory of a process grows by less
than 5 % from 10 % to the end when it keeps no per-task state: the agents compact their
documents (docs/faults.md "Agents that run for months"). ``tests/test_faults_soak.py``
runs the same with fewer tasks.

``protocol`` 3 (``python -m bench --only soak --protocol 3``) runs the same processes in a
v3 room (``--v3-room v3``, each agent its own identity): there no agent keeps the room's
history; the owners replace their long-lived documents by new epochs and task documents
are dropped (docs/protocol-v3.md §9).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from igora import Client, IgoraError

from .common import Cluster, Section, Target, table

NAME = "soak"
TASKS = 100_000
QUICK_TASKS = 10_000
IN_FLIGHT = 64  # tasks at once: half on the Client, half through the gateway
MARKS = (10, 50, 100)  # % of the run where memory is sampled
GROWTH = 0.05  # at most this growth of any process's memory from the first mark to the end
WINDOW = 2.5  # seconds of readings at each mark
EXTRA = 20_000  # tasks at most after the last mark, while its readings are taken
STARTED = re.compile(r"task (\S+) started")
GRANT = "1000000000"
"""Credits each identity of a v3 room gets (``--grant``): the default (100) pays for
about 4,000 echo tasks, after which the gateway answers 402 and the asker waits."""


def rss(pid: int) -> int:
    """Resident memory of a process, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def _via_gateway(http: httpx.AsyncClient, base: str, i: int, stream: bool) -> str:
    body = {
        "model": "echo",
        "stream": stream,
        "messages": [{"role": "user", "content": f"soak {i}"}],
    }
    if not stream:
        r = await http.post(f"{base}/v1/chat/completions", json=body)
        r.raise_for_status()
        return str(r.json()["choices"][0]["message"]["content"])
    text = ""
    async with http.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                choices = json.loads(line[6:]).get("choices") or [{}]
                text += (choices[0].get("delta") or {}).get("content") or ""
    return text


async def drive(
    url: str,
    gateway: str,
    n: int,
    pids: dict[str, int],
    warmup: int = 0,
    room: str | None = None,
) -> dict[str, Any]:
    """Run ``warmup`` tasks, then ``n`` measured ones; return the memory samples (at
    10, 50 and 100 % of the ``n``) and what went wrong.

    Each sample reads every process's memory every 0.1 s for ``WINDOW`` s (longer than
    the 2 s between two compactions) while tasks keep flowing, and keeps the least and
    the most: an instant reading lands anywhere between a process's memory at rest and
    its peak during a compaction (a few MB, set by the rate of tasks, not their number).
    Tasks go on until the last window closes, so the end is measured under load too."""
    answered = bytearray(warmup + n + EXTRA)  # fixed size: this process stays flat
    wrong = 0
    errors: list[str] = []
    done = 0
    issued = 0
    marks = [warmup + max(1, n * m // 100) for m in MARKS]
    samples: list[dict[str, Any]] = []
    windows: list[asyncio.Task[None]] = []
    pids = {**pids, "client process": os.getpid()}
    started = time.monotonic()
    finished = asyncio.Event()

    async def sample(tasks: int) -> None:
        at = time.monotonic() - started
        low = {k: rss(p) for k, p in pids.items()}
        high = dict(low)
        for _ in range(int(WINDOW / 0.1)):
            await asyncio.sleep(0.1)
            for k, p in pids.items():
                value = rss(p)
                low[k], high[k] = min(low[k], value), max(high[k], value)
        samples.append({"tasks": tasks, "seconds": at, "rss": low, "peak": high})
        if len(samples) == len(MARKS):
            finished.set()

    limits = httpx.Limits(max_connections=IN_FLIGHT, max_keepalive_connections=IN_FLIGHT)
    async with (
        Client(url, room, name="soak-client", connect_timeout=60) as client,
        httpx.AsyncClient(timeout=300, limits=limits) as http,
    ):
        await client.wait_for_worker(None, 60)

        async def loop(slot: int) -> None:
            nonlocal wrong, done, issued
            while not finished.is_set() and issued < len(answered):
                i, issued = issued, issued + 1
                stream = (i // 2) % 2 == 1
                try:
                    if slot % 2:
                        text = await _via_gateway(http, gateway, i, stream)
                    elif stream:
                        text = "".join(
                            [
                                p
                                async for p in await client.chat(
                                    f"soak {i}", stream=True, timeout=300
                                )
                            ]
                        )
                    else:
                        text = await client.chat(f"soak {i}", timeout=300)
                except (httpx.HTTPError, IgoraError, KeyError, ValueError) as exc:  # reported
                    if len(errors) < 20:
                        errors.append(
                            f"task {i} ({'gateway' if slot % 2 else 'Client'}, "
                            f"{time.monotonic() - started:.1f} s): "
                            f"{type(exc).__name__}: {exc!r}"
                        )
                else:
                    answered[i] += 1
                    wrong += text != f"Echo: soak {i}"
                done += 1
                if marks and done >= marks[0]:
                    marks.pop(0)
                    windows.append(asyncio.create_task(sample(done)))

        await asyncio.gather(*(loop(s) for s in range(IN_FLIGHT)))
        await asyncio.gather(*windows)
    samples.sort(key=lambda x: x["tasks"])
    ran = answered[:issued]
    return {
        "tasks": issued,
        "warmup": warmup,
        "seconds": time.monotonic() - started,
        "samples": samples,
        "lost": ran.count(0),
        "twice": issued - ran.count(0) - ran.count(1),
        "wrong": wrong,
        "errors": errors,
    }


def client_process(
    cluster: Cluster, gateway: str, n: int, warmup: int, pids: dict[str, int], out: Path
) -> Any:
    """Start the client process (``python -m bench.soak``) on ``cluster`` (in its room,
    with its own identity if it is a v3 one)."""
    room = getattr(cluster, "room", None)
    return cluster.spawn(
        cluster.url,
        gateway,
        str(n),
        str(warmup),
        str(out),
        room or "-",
        *(f"{k}={p}" for k, p in pids.items()),
        name="soak-client",
        module="bench.soak",
        env=cluster.agent_data("soak-client") if room else None,
    )


def executions(logs: list[str]) -> Counter[str]:
    """How many times each task was started, from the workers' logs (level info)."""
    counts: Counter[str] = Counter()
    for text in logs:
        counts.update(STARTED.findall(text))
    return counts


def growth(result: dict[str, Any]) -> dict[str, float]:
    """Each process's memory growth from the first sample to the last (a fraction)."""
    first, last = result["samples"][0]["rss"], result["samples"][-1]["rss"]
    return {k: (last[k] - first[k]) / first[k] for k in first}


async def soak(n: int, warmup: int = 0, protocol: int = 2) -> tuple[dict[str, Any], Counter[str]]:
    """Run the soak on a new cluster: the client process's figures, and how many times
    each task was started by a worker."""
    with Cluster("soak", protocol) as c:
        pids = {
            "market": c.room_market("--grant", GRANT).pid,
            "broker": c.room_broker("--heartbeat", "1", "--log-level", "info").pid,
        }
        for name in ("worker 1", "worker 2"):
            pids[name] = c.room_worker(
                "--slots", "8", "--log-level", "info", name=name.replace(" ", "")
            ).pid
        gw, base = c.room_gateway("--log-level", "warning", "--wait-worker", "30")
        pids["gateway"] = gw.pid
        await c.wait_agents_async("worker", 2, timeout=120)
        out = c.dir / "soak.json"
        proc = client_process(c, base, n, warmup, pids, out)
        while proc.poll() is None:
            await asyncio.sleep(0.5)
        if proc.returncode != 0:
            raise RuntimeError(f"the soak client failed (logs in {c.dir})")
        result = json.loads(out.read_text())
        result["dir"] = str(c.dir)
        logs = [p.read_text(errors="replace") for p in sorted(c.dir.glob("*worker*.log"))]
        if len(result["samples"]) != len(MARKS):
            raise RuntimeError(
                f"the soak client took {len(result['samples'])} samples (logs in {c.dir})"
            )
        return result, executions(logs)


async def run(quick: bool, protocol: int = 2, tasks: int | None = None) -> Section:
    n = tasks or (QUICK_TASKS if quick else TASKS)
    result, runs = await soak(n, protocol=protocol)
    grown = growth(result)
    samples = result["samples"]
    names = list(samples[0]["rss"])
    rows = [
        [
            name,
            *(f"{s['rss'][name] / 2**20:.1f} ({s['peak'][name] / 2**20:.1f})" for s in samples),
            f"{grown[name] * 100:+.1f} %",
        ]
        for name in names
    ]
    rate = result["tasks"] / result["seconds"]
    twice = sum(1 for v in runs.values() if v > 1)
    room = "a v3 room (`--v3-room`, protocol 3)" if protocol == 3 else "the default (v2) room"
    body = (
        f"{n:,} echo tasks in {room}, {IN_FLIGHT} at once, from one client process: half "
        "through its "
        "`Client` (one market connection for the whole run), half through the gateway "
        "(`POST /v1/chat/completions`, httpx); half of each streamed. Market, broker, two "
        "echo workers (8 slots each), gateway and client process run for the whole soak; "
        + (
            "the owners replace their long-lived documents by new epochs, the task "
            "documents are dropped (docs/protocol-v3.md §9); every run is paid (receipts, "
            f"claims, the market's ledger: each identity granted {int(GRANT):,} credits). "
            if protocol == 3
            else "every agent compacts its own document (docs/faults.md). "
        )
        + "Resident memory (MiB) "
        f"when 10 %, 50 % and 100 % of the tasks were answered: the least of the readings "
        f"taken every 0.1 s for {WINDOW:g} s while tasks flow (in brackets the most: a "
        f"{'replace' if protocol == 3 else 'compaction'} under way), and the growth of the "
        "least from 10 % to the end:\n\n"
        + table(
            [
                "process",
                *(f"{s['tasks']:,} tasks ({s['seconds']:.0f} s)" for s in samples),
                "10 % -> end",
            ],
            rows,
        )
        + f"\n\n{result['tasks']:,} tasks (the last ones while the memory was read) in "
        f"{result['seconds']:.0f} s ({rate:.0f} tasks/s); "
        f"lost {result['lost']}, answered twice {result['twice']}, wrong answers "
        f"{result['wrong']}, started twice by a worker {twice} (from the workers' logs: "
        f"{len(runs):,} tasks started).\n"
    )
    worst = max(grown.values())
    ok = (
        not result["lost"]
        and not result["twice"]
        and not result["wrong"]
        and not twice
        and len(runs) == result["tasks"]
    )
    where = " on a v3 room" if protocol == 3 else ""
    return Section(
        "Soak: memory of every process" + (" (protocol 3)" if protocol == 3 else ""),
        body,
        [
            Target(
                f"Soak{where} ({n:,} tasks): memory growth of every process from 10 % to the end",
                f"< {GROWTH * 100:.0f} %",
                f"{worst * 100:+.1f} % (worst)",
                worst < GROWTH,
                17,
            ),
            Target(
                f"Soak{where} ({n:,} tasks): tasks lost or run twice",
                "0",
                f"{result['lost'] + result['twice'] + twice} (wrong answers {result['wrong']})",
                ok,
                17,
            ),
        ],
        {"result": result, "growth": grown, "started_twice": twice},
    )


def main() -> None:
    url, gateway, n, warmup, out, room = sys.argv[1:7]
    pids = {k: int(v) for k, v in (a.split("=", 1) for a in sys.argv[7:])}
    result = asyncio.run(
        drive(url, gateway, int(n), pids, int(warmup), None if room == "-" else room)
    )
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
