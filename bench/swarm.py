"""A swarm process: N raw ``igora.agent.Agent`` connections to one room, with churn.

``python -m bench.swarm URL N HEARTBEAT CHURN SECONDS READY_FILE``: connects N agents
(awareness heartbeat HEARTBEAT s), writes READY_FILE once all are synced, then every
second replaces CHURN of them (one leaves, a new one joins) for SECONDS seconds.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from pathlib import Path

from igora.agent import Agent
from igora.config import MarketAddress


async def main(url: str, n: int, heartbeat: float, churn: float, seconds: float,
               ready: str) -> None:
    address = MarketAddress(url, "market")
    count = 0

    def make() -> Agent:
        nonlocal count
        count += 1
        return Agent(address, type="client", name=f"swarm-{count}", style="text",
                     heartbeat=heartbeat, connect_timeout=300)

    agents = [make() for _ in range(n)]
    for i in range(0, n, 25):  # connect in waves, as a crowd arriving
        await asyncio.gather(*(a.start() for a in agents[i:i + 25]))
    Path(ready).write_text("ready")
    end = time.monotonic() + seconds
    carry = 0.0
    while time.monotonic() < end:
        await asyncio.sleep(1.0)
        carry += churn
        while carry >= 1:
            carry -= 1
            old = agents.pop(random.randrange(len(agents)))
            await old.stop()
            new = make()
            await new.start()
            agents.append(new)
    await asyncio.gather(*(a.stop() for a in agents))


if __name__ == "__main__":
    url, n, hb, churn, seconds, ready = sys.argv[1:7]
    asyncio.run(main(url, int(n), float(hb), float(churn), float(seconds), ready))
