"""Memory over many tasks in a v3 room (docs/protocol-v3.md §9, §12 step 6): the owners
of long-lived documents replace them by new epochs, the market drops the task documents
nobody reads or writes any more, and what every agent and the market hold stays bounded
whatever the number of tasks; with the broker's and worker's fixes that step brought (a
task no worker serves fails at once, a worker restarted into a task's attempt does not
run it).

A real market (``igora market --v3-room v3``) in its own process; the broker, the worker
and the asker (``igora.Client``) in this one, so that their documents are read as they
are, not inferred from timing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from nacl.signing import SigningKey
from pycrdt import Map

from igora import Client
from igora.engines.echo import EchoEngine
from igora.errors import NoWorkerError
from igora.identity import Identity
from igora.testing import Cluster, wait_for
from igora.v3 import broker as broker_module
from igora.v3.broker import V3Broker
from igora.v3.epochs import REPLACE_AFTER
from igora.v3.session import GONE_KEPT, EventKind, Session
from igora.v3.tasks import TASKS as TASK_ENTRIES
from igora.v3.tasks import inbox, prompt_doc
from igora.v3.worker import V3Worker

ROOM = "v3"
TASKS = 1_600  # > 3 epochs of a/ (one deletion a task), > GONE_KEPT unsubscriptions
AT_ONCE = 32
LONG_LIVED = ("a/", "w/", "in/", "dir", "who", "board", "standing")
HELD_MAX = 30_000
"""Bytes of a long-lived document's state in an agent, at most: its live entries (none
at the end) and up to REPLACE_AFTER tombstones of ~25 B. Without epochs (measured): 41 KB
for a/ and each inbox, 62 KB for w/ after TASKS tasks."""


def identity() -> Identity:
    return Identity(SigningKey.generate())


def session(cluster: Cluster, who: Identity, name: str) -> Session:
    return Session(
        f"{cluster.url}/{ROOM}", who, data=cluster.dir / "agents", name=name, heartbeat=1.0
    )


async def status(cluster: Cluster) -> dict[str, Any]:
    rooms = (await asyncio.to_thread(cluster.status))["rooms"]
    return next(r for r in rooms if r["name"] == ROOM)


class Worker:
    """A V3Worker running in this process, on its own session."""

    def __init__(self, cluster: Cluster, who: Identity, engine: EchoEngine, slots: int) -> None:
        self.session = session(cluster, who, "worker")
        self.role = V3Worker(self.session, who, engine, name="w", slots=slots)
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> V3Worker:
        await self.session.start()
        self.task = asyncio.create_task(self.role.run())
        return self.role

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.session.stop()


@asynccontextmanager
async def agents(
    cluster: Cluster, delay: float = 0.0, slots: int = 16
) -> AsyncIterator[tuple[V3Broker, V3Worker, Client]]:
    """A broker, an echo worker and a connected asker, in this process."""
    bs = session(cluster, identity(), "broker")
    await bs.start()
    broker = V3Broker(bs)
    routing = asyncio.create_task(broker.run())
    w = Worker(cluster, identity(), EchoEngine(delay=delay), slots)
    worker = await w.start()
    client = Client(cluster.url, ROOM, name="asker", timeout=60)
    try:
        await client.connect()
        await client.wait_for_worker(None, 20)
        yield broker, worker, client
    finally:
        await client.close()
        routing.cancel()
        await asyncio.gather(routing, return_exceptions=True)
        await bs.stop()
        await w.stop()


def held(s: Session) -> dict[str, int]:
    """Bytes of each long-lived document's state as ``s`` holds it."""
    return {n: len(d.get_update()) for n, d in s.docs.items() if n.startswith(LONG_LIVED)}


def test_documents_stay_bounded_over_thousands_of_tasks(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster.market("--v3-room", ROOM, "--task-retention", "2")
    monkeypatch.setenv("IGORA_DATA", str(cluster.dir / "asker"))

    async def main() -> None:
        async with agents(cluster) as (broker, worker, client):
            assert client.v3 is not None
            asker = client.v3.session
            gate = asyncio.Semaphore(AT_ONCE)
            wrong: list[str] = []

            async def one(i: int) -> None:
                async with gate:
                    answer = await client.chat(f"q{i}")
                    if answer != f"Echo: q{i}":
                        wrong.append(answer)

            await asyncio.gather(*(one(i) for i in range(TASKS)))
            assert not wrong
            # The broker cleans the inboxes after the askers' deletions; the worker
            # drops its runs once their assignments go.
            await wait_for(lambda: not worker.jobs, 20, "the worker's runs dropped")
            room = await wait_for(
                lambda: _settled(cluster), 20, "no task document left at the market"
            )
            # Every owner started new epochs: the asker's a/ (one deletion a task: the
            # header), the worker's w/ (one: its entry, written once at the end of a
            # run as fast as echo's), the broker's two inboxes (one each: the entry read).
            assert asker.replaced >= TASKS // REPLACE_AFTER
            assert worker.session.replaced >= TASKS // REPLACE_AFTER
            assert broker.session.replaced >= 2 * TASKS // REPLACE_AFTER
            # ...which every reader took: its Doc of each is no larger than the owner's.
            sessions = {"asker": asker, "broker": broker.session, "worker": worker.session}
            for name, s in sessions.items():
                sizes = held(s)
                assert sizes and max(sizes.values()) < HELD_MAX, (name, sizes)
                # Nothing per task is held: the long-lived documents only.
                assert set(s.docs) == set(sizes), (name, sorted(s.docs))
                assert len(s._gone) <= GONE_KEPT
            assert not client.v3.tracking and not broker._verified
            # The market: the five long-lived documents of the agents (the asker's a/
            # and inbox, the worker's w/ and inbox, the broker's board), and their logs
            # bounded by their epochs (each at most REPLACE_AFTER deleted entries; their
            # merges drop the content: measured ~0.1 MB in all; 0.5 MB with merges that
            # kept it, 1.76 MB without epochs).
            assert room["documents"] == 5, room
            logs = room["bytes"]
            assert logs["a"] + logs["in"] + logs["w"] < 2 * REPLACE_AFTER * 1_000, logs
            assert set(logs) == {"a", "in", "w", "board", "dir", "who", "standing"}, logs

    asyncio.run(main())


def test_an_ended_task_leaves_the_inboxes_with_their_next_update(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """protocol-v3.md §7.2 step 10: the broker deletes an ended task's inbox entries with
    its next write to each inbox (or after ``LINGER``), so an asker asking one task after
    another gets one update of its inbox per task, not two (the deletion alone)."""
    cluster.market("--v3-room", ROOM)
    monkeypatch.setenv("IGORA_DATA", str(cluster.dir / "asker"))
    monkeypatch.setattr(broker_module, "LINGER", 600.0)
    asked = 6

    async def main() -> None:
        async with agents(cluster) as (_, worker, client):
            assert client.v3 is not None
            asker, box = client.v3.session, inbox(client.v3.id)
            assert await client.chat("first") == "Echo: first"  # the inbox made (its sync)
            await asyncio.sleep(broker_module.SETTLE)  # no cleanup in a lease's first second
            updates: list[str] = []
            asker.observe(lambda e: updates.append(e.name) if e.kind is EventKind.CHANGED else None)
            for i in range(asked):
                assert await client.chat(f"q{i}") == f"Echo: q{i}"
                await asyncio.sleep(3 * broker_module.TICK)  # a turn or more in between
            entries = asker.docs[box].get(TASK_ENTRIES, type=Map)
            await wait_for(lambda: not client.v3.tracking, 10, "the last task forgotten")
            assert updates.count(box) == asked  # each assignment took the previous deletion
            assert len(entries) == 1  # the last task's status, until the next write...
            assert len(worker.jobs) == 1
            monkeypatch.setattr(broker_module, "LINGER", 0.2)  # ...or LINGER
            await wait_for(lambda: len(entries) == 0, 10, "the last status deleted")
            await wait_for(lambda: not worker.jobs, 10, "the last assignment deleted")
            assert updates.count(box) == asked + 1

    asyncio.run(main())


async def _settled(cluster: Cluster) -> dict[str, Any] | None:
    room = await status(cluster)
    return room if room["documents"] == 5 else None


def test_a_reader_takes_each_epoch_even_across_a_reconnection(
    cluster: Cluster,
) -> None:
    """An owner writes and deletes past REPLACE_AFTER twice; a second connection of the
    same identity reads the document throughout and, once, was disconnected while the
    replace happened: it holds exactly the owner's entries each time (no entry deleted
    before the epoch comes back)."""
    cluster.market("--v3-room", ROOM)
    me = identity()
    name = f"a/{me.id}"

    async def main() -> None:
        owner, reader = session(cluster, me, "owner"), session(cluster, me, "reader")
        await owner.start()
        await reader.start()
        try:
            doc = owner.own(name)
            reader.subscribe(name)
            notices: list[int] = []
            reader.observe(lambda e: notices.append(e.code) if e.kind is EventKind.NOTICE else None)

            async def churn(tag: str, n: int) -> None:
                for i in range(n):
                    tasks = owner.docs[name].get("tasks", type=Map)
                    tasks[f"{tag}{i}"] = {"i": i}
                    if i % 10:
                        del tasks[f"{tag}{i}"]
                    await asyncio.sleep(0)  # a replace is due between two transactions

            def same() -> bool:
                mine = owner.docs[name].get("tasks", type=Map).to_py()
                theirs = reader.docs.get(name)
                return theirs is not None and theirs.get("tasks", type=Map).to_py() == mine

            await churn("x", REPLACE_AFTER + 100)
            assert owner.docs[name] is not doc and owner.replaced == 1
            await wait_for(same, 10, "the reader has the new epoch")
            assert 205 in notices
            before = reader.docs[name]
            # Disconnected while the owner replaces again: back, it takes the new epoch.
            assert reader._ws is not None
            await reader._ws.close()
            await churn("y", REPLACE_AFTER + 100)
            assert owner.replaced == 2
            await wait_for(lambda: reader.connected and same(), 20, "the reader caught up")
            assert reader.docs[name] is not before
            assert len(reader.docs[name].get("tasks", type=Map)) == 2 * (
                (REPLACE_AFTER + 100) // 10
            )
        finally:
            await reader.stop()
            await owner.stop()

    asyncio.run(main())


def test_the_market_drops_task_documents_nobody_reads_or_writes(cluster: Cluster) -> None:
    """An owner that never drops its prompt document (it crashed, or forgot): after the
    retention time with nobody reading or writing it, the market drops it, tells the
    owner (which stops holding it) and counts it; the identity may own new ones."""
    cluster.market("--v3-room", ROOM, "--task-retention", "1")
    me = identity()
    name = prompt_doc(me.id, "T" * 16)

    async def main() -> None:
        s = session(cluster, me, "forgetful")
        await s.start()
        dropped: list[str] = []
        s.observe(lambda e: dropped.append(e.name) if e.kind is EventKind.DROPPED else None)
        try:
            s.own(name).get("prompt", type=Map)["ct"] = b"sealed"
            await wait_for(lambda: _documents(cluster, 1), 5, "the prompt at the market")
            await wait_for(lambda: dropped == [name], 10, "the prompt expired")
            assert name not in s.docs
            room = await status(cluster)
            assert room["documents"] == 0 and room["expired"] == 1
        finally:
            await s.stop()

    asyncio.run(main())


async def _documents(cluster: Cluster, n: int) -> bool:
    return bool((await status(cluster))["documents"] == n)


def test_a_task_no_worker_serves_fails_at_once(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As in a v2 room: a task whose model the workers present do not serve (its worker
    left before the broker gave it) fails with ``model_not_served`` within seconds, not
    at its deadline; served tasks go on."""
    cluster.market("--v3-room", ROOM)
    monkeypatch.setenv("IGORA_DATA", str(cluster.dir / "asker"))

    async def main() -> None:
        async with agents(cluster) as (broker, _worker, client):
            other = Worker(cluster, identity(), EchoEngine(model="rare"), 1)
            await other.start()
            await client.wait_for_worker("rare", 20)
            broker.session.lease = False  # the broker does nothing for a while
            task = await client.submit("anyone?", model="rare", timeout=300)
            await other.stop()
            await wait_for(lambda: "rare" not in client.models(), 10, "the worker gone")
            broker.session.lease = True
            # the broker's code (model_not_served) is what the Client raises on
            with pytest.raises(NoWorkerError, match="serves model 'rare'"):
                await asyncio.wait_for(task.result(), 30)
            assert await client.chat("still served") == "Echo: still served"

    asyncio.run(main())


def test_a_worker_restarted_into_a_running_attempt_does_not_run_it(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker's process is replaced by a new one (same identity, new session key)
    while the broker does not look: the assignment in its inbox is the old process's.
    The new one does not run it under that attempt (its run would mix two salts and two
    answer keys in one run document: the asker failed "unreadable"); the broker sees
    the new key and gives the task attempt 2, which the new process runs."""
    cluster.market("--v3-room", ROOM)
    monkeypatch.setenv("IGORA_DATA", str(cluster.dir / "asker"))
    caplog.set_level("INFO", "igora.worker")

    async def main() -> None:
        async with agents(cluster, delay=0.05, slots=1) as (broker, worker, client):
            text = " ".join(f"w{i}" for i in range(60))
            task = await client.submit(text)
            await wait_for(lambda: worker.jobs, 10, "the task started")
            broker.session.lease = False  # it would see the worker leave
            old = next(t for t in asyncio.all_tasks() if "V3Worker.run" in repr(t.get_coro()))
            old.cancel()
            await worker.session.stop()
            again = Worker(cluster, worker.identity, EchoEngine(), 1)
            new = await again.start()
            try:
                await wait_for(
                    lambda: "was our previous process's" in caplog.text, 10, "the old attempt seen"
                )
                assert not new.jobs
                broker.session.lease = True
                answer = await asyncio.wait_for(task.result(), 60)
                assert answer.text == f"Echo: {text}"
                assert new.completed == 1 and f"task {task.id} started (attempt 2)" in caplog.text
            finally:
                await again.stop()

    asyncio.run(main())


@pytest.fixture(autouse=True)
def _agents_folder(cluster: Cluster) -> None:
    Path(cluster.dir / "agents").mkdir(exist_ok=True)
