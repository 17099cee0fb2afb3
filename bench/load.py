"""A load process: K askers in a closed loop (each asks again as soon as its answer is in).

``python -m bench.load URL K START DURATION OUT [--shared]`` connects K ``Client``s (each
its own market connection), or with ``--shared`` one ``Client`` whose K loops share its
connection (as a gateway serves many users), waits until the wall-clock time START, then
has each loop ask short echo prompts one after the other for DURATION seconds; it writes
the count of answers and their latencies to OUT (JSON).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from igora import Client


async def main(
    url: str, k: int, start: float, duration: float, out: str, shared: bool = False
) -> None:
    n_clients = 1 if shared else k
    clients = [Client(url, name=f"load-{i}", connect_timeout=60) for i in range(n_clients)]
    await asyncio.gather(*(c.connect() for c in clients))
    await clients[0].wait_for_worker(None, 60)
    latencies: list[float] = []
    errors = 0
    end = start + duration

    async def loop(c: Client, i: int) -> None:
        nonlocal errors
        n = 0
        while time.time() < end:
            t0 = time.time()
            try:
                text = await c.chat(f"load {i} {n}", wait_worker=30)
                assert text == f"Echo: load {i} {n}", text
            except Exception:
                errors += 1
            t1 = time.time()
            n += 1
            if start <= t0 and t1 <= end:
                latencies.append(t1 - t0)

    await asyncio.sleep(max(0.0, start - 1.0 - time.time()))
    # one second of warm-up before the window opens
    await asyncio.gather(*(loop(clients[i % n_clients], i) for i in range(k)))
    await asyncio.gather(*(c.close() for c in clients))
    with open(out, "w") as f:
        json.dump({"latencies": latencies, "errors": errors}, f)


if __name__ == "__main__":
    url, k, start, duration, out = sys.argv[1:6]
    asyncio.run(
        main(url, int(k), float(start), float(duration), out, shared="--shared" in sys.argv[6:])
    )
