"""CPU per task by role, in one cell of the throughput grid (not part of ``make bench``).

``python -m bench.cpu_per_task PROTOCOL WORKERS CLIENTS [--shared] [--duration S]
[--spy DIR]`` starts a cluster as ``bench.throughput`` does (market, broker, WORKERS echo
workers of 4 slots, CLIENTS closed loops in its load processes, or on one connection with
``--shared``), and prints the cell's tasks/s and latency with the CPU time (user + system,
from ``/proc/PID/stat``) each role spent during the window, per answer: the figure to
compare before and after a change on a shared machine, where tasks/s follow the load of
the other processes more than the code. The main threads of the market and the broker
are also given alone: each is one process, so on a machine with cores to spare the
tasks/s of a cell cannot pass 1 ÷ the larger of the two. ``--spy DIR`` also records
``py-spy`` profiles (raw format) of the market, the broker, the first worker and the first
load process in ``DIR`` (py-spy must be installed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import time
from pathlib import Path

from .common import Cluster, cpu_seconds, load_processes, pct


async def cell(
    protocol: int, workers: int, clients: int, shared: bool, duration: float, spy: Path | None
) -> str:
    with Cluster(f"cpu-{workers}", protocol) as c:
        market, broker = c.room_market(), c.room_broker()
        ws = [c.room_worker("--slots", "4", name=f"w{i}") for i in range(workers)]
        await c.wait_agents_async("worker", workers, timeout=180)
        await c.wait_agents_async("broker", 1, timeout=180)
        procs = 1 if shared else load_processes(clients)
        share = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
        per_client = 0.06 if protocol == 2 else 0.3  # as bench.throughput
        start = time.time() + 3.0 + (0.0 if shared else per_client * clients)
        outs, loads = [], []
        for i, k in enumerate(share):
            tag = f"load-{clients}-{i}"
            outs.append(c.dir / f"{tag}.json")
            loads.append(
                c.spawn(
                    c.url,
                    str(k),
                    str(start),
                    str(duration),
                    str(outs[-1]),
                    *(["--shared"] if shared else []),
                    *c.load_args(tag),
                    name=f"load{i}",
                    module="bench.load",
                )
            )
        roles = {"market": [market], "broker": [broker], "workers": ws, "askers": loads}
        await asyncio.sleep(max(0.0, start - time.time()))
        spies = []
        if spy is not None:
            spy.mkdir(parents=True, exist_ok=True)
            for name, p in (("market", market), ("broker", broker), ("worker", ws[0])):
                spies.append(_spy(p.pid, spy / f"{name}.txt", duration))
            spies.append(_spy(loads[0].pid, spy / "asker.txt", duration))
        before = {r: sum(cpu_seconds(p.pid) for p in ps) for r, ps in roles.items()}
        main0 = {r: cpu_seconds(ps[0].pid, ps[0].pid) for r, ps in roles.items()}
        await asyncio.sleep(duration)
        after = {r: sum(cpu_seconds(p.pid) for p in ps) for r, ps in roles.items()}
        main1 = {r: cpu_seconds(ps[0].pid, ps[0].pid) for r, ps in roles.items()}
        for p in loads:
            while p.poll() is None:
                await asyncio.sleep(0.2)
        for s in spies:
            s.wait()
        lat: list[float] = []
        errors = 0
        for out in outs:
            r = json.loads(out.read_text())
            lat += [t1 - t0 for t0, t1 in r["done"] if start <= t1 <= start + duration]
            errors += r["errors"]
    n = max(len(lat), 1)
    spent = {r: after[r] - before[r] for r in roles}
    by_role = ", ".join(f"{r} {1000 * s / n:.2f}" for r, s in spent.items())
    mains = {r: main1[r] - main0[r] for r in ("market", "broker")}
    by_role += (
        " (main threads: " + ", ".join(f"{r} {1000 * s / n:.2f}" for r, s in mains.items()) + ")"
    )
    return (
        f"v{protocol} {workers} workers x {clients} clients{' (one connection)' if shared else ''}"
        f": {len(lat) / duration:.0f} tasks/s, p50 {1000 * pct(lat, 50):.1f} ms, "
        f"errors {errors}; CPU ms per task: {by_role}, total "
        f"{1000 * sum(spent.values()) / n:.2f} ({100 * sum(spent.values()) / duration:.0f} % "
        "of a core)"
    )


def _spy(pid: int, out: Path, duration: float) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            *("py-spy", "record", "--pid", str(pid), "-o", str(out), "--format", "raw"),
            *("--duration", str(int(duration)), "--nonblocking"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_per_task", description=__doc__)
    p.add_argument("protocol", type=int, choices=(2, 3))
    p.add_argument("workers", type=int)
    p.add_argument("clients", type=int)
    p.add_argument("--shared", action="store_true", help="the loops share one connection")
    p.add_argument("--duration", type=float, default=6.0, help="the window, in seconds")
    p.add_argument("--spy", type=Path, default=None, help="record py-spy profiles here")
    a = p.parse_args()
    print(asyncio.run(cell(a.protocol, a.workers, a.clients, a.shared, a.duration, a.spy)))


if __name__ == "__main__":
    main()
