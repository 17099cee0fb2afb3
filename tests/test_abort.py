"""Abort: the worker stops at the next token and frees its slot."""

from __future__ import annotations

import asyncio

import pytest

from igora import Client, TaskAborted

from .conftest import Cluster


async def test_abort_stops_generation_and_frees_the_slot(cluster: Cluster) -> None:
    cluster.market()
    cluster.broker()
    cluster.worker("--delay", "0.02", name="slowpoke")
    cluster.wait_agents("worker", 1)
    async with Client(cluster.url) as client:
        task = await client.submit("#repeat 2000")
        received = ""
        with pytest.raises(TaskAborted) as err:
            async for piece in task.stream():
                received += piece
                if len(received) > 30:
                    task.abort()
        final = err.value.task
        assert final["state"] == "aborted"
        assert 30 < len(final["response"]) < len("tok1999 ") * 200
        # The slot is free again: the next task runs at once.
        assert (await client.chat("next", timeout=30)) == "Echo: next"
        for _ in range(50):
            if all(int(w.state.get("running") or 0) == 0 for w in client.workers()):
                break
            await asyncio.sleep(0.1)
        assert all(int(w.state.get("running") or 0) == 0 for w in client.workers())
