"""A load process: K askers in a closed loop (each asks again as soon as its answer is in),
or with ``--every`` in an open loop (each asks at a fixed pace, answered or not).

``python -m bench.load URL K START DURATION OUT [--shared] [--every SECONDS] [--room ROOM]
[--data DIR]`` connects K ``Client``s (each its own market connection), or with
``--shared`` one ``Client`` whose K loops share its connection (as a gateway serves many
users), waits until the wall-clock time START, then has each loop ask short echo prompts
for DURATION seconds: one after the other, or with ``--every SECONDS`` one every SECONDS,
loop i's first at START + SECONDS × i ÷ K (the K loops spread evenly over the period:
K ÷ SECONDS tasks/s offered), each timed from when it was due (a late ask counts as
waiting); SIGUSR1 ends the DURATION there. It writes to OUT (JSON) when each answer
was asked for and when it came in (``done``), the count of errors, and how late it was
ready (``late``).
``--room`` names the room (default: the market's default room); ``--data DIR`` gives
client i its own data folder ``DIR/load-i``, hence its own identity (what a protocol 3
room needs of each agent; the clients then connect one after the other, since a client
reads ``IGORA_DATA`` when it connects).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time

from igora import Client


async def connect_all(clients: list[Client], data: str | None) -> None:
    if data is None:
        await asyncio.gather(*(c.connect() for c in clients))
        return
    for i, c in enumerate(clients):
        os.environ["IGORA_DATA"] = os.path.join(data, f"load-{i}")
        await c.connect()


async def main(
    url: str,
    k: int,
    start: float,
    duration: float,
    out: str,
    shared: bool = False,
    room: str | None = None,
    data: str | None = None,
    every: float | None = None,
) -> None:
    end = start + duration

    def stop() -> None:
        nonlocal end
        end = min(end, time.time())

    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, stop)
    n_clients = 1 if shared else k
    clients = [Client(url, room, name=f"load-{i}", connect_timeout=60) for i in range(n_clients)]
    await connect_all(clients, data)
    await clients[0].wait_for_worker(None, 60)
    late = max(0.0, time.time() - start)  # connected after the window opened: counts less
    done: list[tuple[float, float]] = []  # (asked, answered) of every answer, wall clock
    errors = 0

    async def ask(c: Client, i: int, n: int, t0: float) -> None:
        nonlocal errors
        try:
            text = await c.chat(f"load {i} {n}", wait_worker=30)
            assert text == f"Echo: load {i} {n}", text
        except Exception:
            errors += 1
        done.append((t0, time.time()))

    async def loop(c: Client, i: int) -> None:
        n = 0
        if every is None:  # closed loop
            while time.time() < end:
                await ask(c, i, n, time.time())
                n += 1
            return
        asks = []  # open loop: each ask when due, whether the previous ones are answered
        while (due := start - 1.0 + every * (i / k + n)) < end:
            await asyncio.sleep(max(0.0, due - time.time()))
            asks.append(asyncio.create_task(ask(c, i, n, due)))
            n += 1
        await asyncio.gather(*asks)

    await asyncio.sleep(max(0.0, start - 1.0 - time.time()))
    # one second of warm-up before the window opens
    await asyncio.gather(*(loop(clients[i % n_clients], i) for i in range(k)))
    await asyncio.gather(*(c.close() for c in clients))
    with open(out, "w") as f:
        json.dump({"done": done, "errors": errors, "late": late}, f)


def option(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


if __name__ == "__main__":
    url, k, start, duration, out = sys.argv[1:6]
    rest = sys.argv[6:]
    asyncio.run(
        main(
            url,
            int(k),
            float(start),
            float(duration),
            out,
            shared="--shared" in rest,
            room=option(rest, "--room"),
            data=option(rest, "--data"),
            every=float(every) if (every := option(rest, "--every")) else None,
        )
    )
