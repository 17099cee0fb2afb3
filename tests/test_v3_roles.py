"""The roles on protocol 3 (docs/protocol-v3.md §7, §12 step 3): a v3 room of a real
market with a broker, two echo workers and two askers (each its own identity), tasks
end to end through ``igora.Client``, abort, a worker killed mid-task, a broker killed."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from igora import Client
from igora.errors import TaskAborted
from igora.task_handle import Restart
from igora.testing import Cluster, wait_until

ROOM = "v3"


def v3_room(cluster: Cluster, workers: int = 2, *worker_args: str) -> None:
    """A market with the v3 room ROOM, a broker and ``workers`` echo workers in it."""
    cluster.market("--v3-room", ROOM)
    cluster.broker("--room", ROOM, data=True)
    for i in range(workers):
        cluster.worker("--room", ROOM, *worker_args, name=f"w{i + 1}", data=True)
    cluster.wait_agents("worker", workers)
    cluster.wait_agents("broker", 1)


@pytest.fixture
def room(cluster: Cluster) -> Iterator[Cluster]:
    v3_room(cluster)
    yield cluster


def asker(cluster: Cluster, name: str, monkeypatch: pytest.MonkeyPatch) -> Client:
    """A client with its own identity (its own IGORA_DATA)."""
    monkeypatch.setenv("IGORA_DATA", cluster.agent_data(name)["IGORA_DATA"])
    return Client(cluster.url, ROOM, name=name, timeout=30)


async def _two(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> tuple[Client, Client]:
    a = asker(cluster, "alice", monkeypatch)
    await a.connect()
    b = asker(cluster, "bob", monkeypatch)
    await b.connect()
    return a, b


def test_tasks_complete_streamed_and_not(room: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        a, b = await _two(room, monkeypatch)
        try:
            assert a.v3 is not None and b.v3 is not None and a.id != b.id
            texts = [f"question {i} from {c.name}" for c in (a, b) for i in range(4)]
            clients = [a] * 4 + [b] * 4
            answers = await asyncio.gather(
                *(c.chat(t, max_tokens=50) for c, t in zip(clients, texts, strict=True))
            )
            assert answers == [f"Echo: {t}" for t in texts]
            pieces = [p async for p in await a.chat("streamed here", stream=True)]
            assert "".join(pieces) == "Echo: streamed here" and len(pieces) >= 1
            workers = {a.worker_of(t) for t in a.v3.tracking}
            assert not a.v3.tracking  # every answer read: the documents went
            del workers
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())
