"""Chaos: workers that die (kill -9) or go silent (SIGSTOP) in the middle of a task.

Brokers run with ``--heartbeat 1 --grace 3``: a killed worker is noticed when its socket
closes, a frozen one after 3 missed heartbeats; its task is re-queued after the grace.
"""

from __future__ import annotations

import os
import signal

import pytest

from igora import Client, Restart, TaskFailed
from igora.protocol import MapName, State, TaskField

from .conftest import Cluster, Proc
from .faults import archived_async, by_name, executions, wait_for, worker_name

TOKENS = 60
EXPECTED = "".join(f"tok{i} " for i in range(TOKENS))
DELAY = "0.04"


def two_slow_workers(cluster: Cluster, *broker_args: str) -> list[Proc]:
    cluster.market()
    cluster.broker(*broker_args)
    workers = [cluster.worker("--delay", DELAY, name=n) for n in ("wa", "wb")]
    cluster.wait_agents("worker", 2)
    cluster.wait_agents("broker", 1)
    return workers


def running_worker(client: Client, task_id: str, workers: list[Proc]) -> Proc | None:
    current = client.agent.maps[MapName.DOING].get(task_id)
    if not isinstance(current, dict) or not current.get(TaskField.WORKER):
        return None
    name = worker_name(client.agent, current[TaskField.WORKER])
    return by_name(workers, name) if name else None


def split_on_restart(pieces: list[str]) -> list[str]:
    """The text of each attempt the client was shown, split on Restart markers."""
    parts = [""]
    for p in pieces:
        if isinstance(p, Restart):
            parts.append("")
        else:
            parts[-1] += p
    return parts


async def test_worker_killed_mid_stream_task_completes_on_another_worker(
    cluster: Cluster,
) -> None:
    workers = two_slow_workers(cluster)
    async with Client(cluster.url) as client:
        task = await client.submit(f"#repeat {TOKENS}", timeout=60)
        pieces: list[str] = []
        killed: Proc | None = None
        async for piece in task.stream():
            pieces.append(piece)
            if killed is None and len("".join(pieces)) > 40:
                killed = running_worker(client, task.id, workers)
                assert killed is not None
                killed.kill()
        answer = task.final
    assert killed is not None and not killed.alive()
    parts = split_on_restart(pieces)
    # One clear restart marker; before it a clean prefix, after it the whole answer.
    assert len(parts) == 2, pieces
    assert parts[0] and EXPECTED.startswith(parts[0])
    assert parts[1] == EXPECTED
    assert answer is not None and answer[TaskField.STATE] == State.DONE.value
    assert answer[TaskField.RESPONSE] == EXPECTED and answer[TaskField.ATTEMPTS] == 2
    survivor = next(w for w in workers if w is not killed)
    assert executions(killed)[task.id] == 1 and executions(survivor)[task.id] == 1
    assert "re-queued" in cluster.procs[1].log()
    archive = await archived_async(cluster, task.id)
    assert archive is not None and archive[TaskField.STATE] == State.DONE.value


async def test_task_whose_workers_keep_dying_ends_failed_after_max_attempts(
    cluster: Cluster,
) -> None:
    workers = two_slow_workers(cluster, "--max-attempts", "2")
    async with Client(cluster.url) as client:
        task = await client.submit(f"#repeat {TOKENS}", timeout=60)
        killed: list[Proc] = []
        with pytest.raises(TaskFailed, match="vanished") as err:
            async for piece in task.stream():
                if isinstance(piece, Restart) or not killed:
                    # Kill whoever runs it now: the first worker, then the second one.
                    w = await wait_for(
                        lambda: running_worker(client, task.id, workers),
                        20,
                        "a worker runs the task",
                        cluster,
                    )
                    w.kill()
                    killed.append(w)
    assert len(killed) == 2
    final = err.value.task
    assert final[TaskField.STATE] == State.FAILED.value and final[TaskField.ATTEMPTS] == 2
    assert "2 attempts" in final[TaskField.ERROR]
    archive = await archived_async(cluster, task.id)
    assert archive is not None and archive[TaskField.STATE] == State.FAILED.value


async def test_frozen_worker_loses_its_task_and_stops_when_it_wakes_up(cluster: Cluster) -> None:
    workers = two_slow_workers(cluster)
    async with Client(cluster.url) as client:
        task = await client.submit(f"#repeat {TOKENS}", timeout=60)
        pieces: list[str] = []
        frozen: Proc | None = None
        try:
            async for piece in task.stream():
                pieces.append(piece)
                if frozen is None and len("".join(pieces)) > 40:
                    frozen = running_worker(client, task.id, workers)
                    assert frozen is not None
                    os.killpg(frozen.pid, signal.SIGSTOP)  # alive, silent: heartbeat goes stale
        finally:
            if frozen is not None:
                os.killpg(frozen.pid, signal.SIGCONT)
        parts = split_on_restart(pieces)
        assert len(parts) == 2 and parts[1] == EXPECTED, pieces
        assert task.final is not None and task.final[TaskField.RESPONSE] == EXPECTED
        survivor = next(w for w in workers if w is not frozen)
        assert frozen is not None
        # Woken up, the frozen worker sees its task was taken away and stops quietly...
        await wait_for(
            lambda: "taken away" in frozen.log(),
            20,
            "the frozen worker notices it lost its task",
            cluster,
        )
        archive = await archived_async(cluster, task.id)
        assert archive is not None and archive[TaskField.STATE] == State.DONE.value
        assert archive[TaskField.RESPONSE] == EXPECTED
        # ... and serves again: with the other worker gone, it answers the next task.
        survivor.kill()
        assert await client.chat("still here", timeout=30, wait_worker=10) == "Echo: still here"
    assert executions(frozen)["" + task.id] == 1
    assert frozen.alive()
