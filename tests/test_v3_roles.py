"""The roles on protocol 3 (docs/protocol-v3.md §7, §12 step 3): a v3 room of a real
market with a broker and two echo workers, askers through ``igora.Client`` (each agent
its own identity, its own IGORA_DATA): tasks end to end, streamed and not, abort, a
worker killed mid-task (retried on the other), a broker killed (the next takes the
lease), the room's documents left once the answers are read, and the gateway unchanged."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from igora import Client
from igora.errors import TaskAborted, TaskFailed
from igora.identity import load_identity
from igora.task_handle import Restart
from igora.testing import Cluster, Proc, free_port, wait_for, wait_until
from tests.upstream_stub import Stub

ROOM = "v3"
SLOW = ("--delay", "0.05")  # echo: seconds per word


def v3_room(cluster: Cluster, *worker_args: str, brokers: int = 1) -> tuple[list[Proc], list[Proc]]:
    """A market with the v3 room ROOM, ``brokers`` brokers and two echo workers in it
    (each with its own identity): the broker and worker processes."""
    cluster.market("--v3-room", ROOM)
    procs = [cluster.broker("--room", ROOM, name=f"b{i + 1}", data=True) for i in range(brokers)]
    workers = [
        cluster.worker("--room", ROOM, *worker_args, name=name, data=True) for name in ("w1", "w2")
    ]
    cluster.wait_agents("worker", 2)
    cluster.wait_agents("broker", brokers)
    return procs, workers


def asker(cluster: Cluster, name: str, monkeypatch: pytest.MonkeyPatch) -> Client:
    """A client with its own identity (its own IGORA_DATA, read when it connects)."""
    monkeypatch.setenv("IGORA_DATA", cluster.agent_data(name)["IGORA_DATA"])
    return Client(cluster.url, ROOM, name=name, timeout=30)


async def connected(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> tuple[Client, Client]:
    a = asker(cluster, "alice", monkeypatch)
    await a.connect()
    b = asker(cluster, "bob", monkeypatch)
    await b.connect()
    assert a.v3 is not None and b.v3 is not None and a.id != b.id
    return a, b


def words(n: int, tag: str) -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


@pytest.fixture
def room(cluster: Cluster) -> Iterator[Cluster]:
    v3_room(cluster)
    yield cluster


def test_tasks_complete_streamed_and_not(room: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        a, b = await connected(room, monkeypatch)
        try:
            texts = [f"question {i} from {c.name}" for c in (a, b) for i in range(4)]
            clients = [a] * 4 + [b] * 4
            answers = await asyncio.gather(
                *(c.chat(t, max_tokens=50) for c, t in zip(clients, texts, strict=True))
            )
            assert answers == [f"Echo: {t}" for t in texts]
            pieces = [p async for p in await a.chat("streamed here", stream=True)]
            assert "".join(pieces) == "Echo: streamed here"
            answer = await (await b.submit([{"role": "user", "content": "as messages"}])).result()
            assert answer.text == "Echo: as messages" and answer.finish_reason == "stop"
            assert answer.usage["completionTokens"] > 0
            # Every answer read: the asker keeps nothing, its header and prompt went.
            assert a.v3 is not None and not a.v3.tracking
        finally:
            await a.close()
            await b.close()
        # The askers dropped their prompts, the broker cleaned the inboxes, the workers
        # dropped their runs: left are a/ of each asker, in/ of each agent, w/ of each
        # worker and the broker's board (2 + 4 + 2 + 1), no task document.
        wait_until(lambda: _documents(room) == 9, 10, "task documents dropped", room)

    asyncio.run(main())


def _documents(cluster: Cluster) -> int:
    rooms = [r for r in cluster.status()["rooms"] if r["name"] == ROOM]
    return int(rooms[0]["documents"]) if rooms else -1


def test_abort_stops_a_running_task(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    v3_room(cluster, *SLOW)

    async def main() -> None:
        a, b = await connected(cluster, monkeypatch)
        try:
            task = await a.submit(words(200, "x"))
            other = b.chat("meanwhile", max_tokens=20)
            got = []
            with pytest.raises(TaskAborted):
                async for piece in task.stream():
                    got.append(piece)
                    if len(got) == 2:
                        task.abort()
            assert 0 < len("".join(got)) < len(words(200, "x"))
            assert await other == "Echo: meanwhile"
            # The worker is free again: the next task runs.
            assert await a.chat("after", max_tokens=10) == "Echo: after"
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_worker_killed_mid_task_is_retried(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, workers = v3_room(cluster, *SLOW)

    async def main() -> None:
        a, b = await connected(cluster, monkeypatch)
        try:
            prompt = words(40, "y")
            task = await a.submit(prompt)
            pieces: list[str] = []
            killed = None
            async for piece in task.stream():
                pieces.append(piece)
                if killed is None:
                    killed = next(w for w in workers if f"task {task.id} started" in w.log())
                    killed.kill(signal.SIGKILL)
            restarts = [i for i, p in enumerate(pieces) if isinstance(p, Restart)]
            assert restarts, "the answer restarted on the other worker"
            assert "".join(pieces[restarts[-1] + 1 :]) == f"Echo: {prompt}"
            alive = next(w for w in workers if w is not killed)
            assert f"task {task.id} started (attempt 2)" in alive.log()
            # the receipt signs attempt 2's chunks alone (the asker hashes them as it
            # reads them, afresh for each attempt): the market pays it, refuses nothing
            await wait_for(lambda: f"task {task.id} paid" in alive.log(), 10, "paid", cluster)
            assert f"claim of task {task.id} refused" not in alive.log()
            assert await b.chat("from bob", max_tokens=10) == "Echo: from bob"
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_broker_killed_the_next_takes_the_lease(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    brokers, _ = v3_room(cluster, brokers=2)

    async def main() -> None:
        a, b = await connected(cluster, monkeypatch)
        try:
            assert await a.chat("before", max_tokens=10) == "Echo: before"
            holder = wait_until(
                lambda: next((b for b in brokers if "lease granted" in b.log()), None),
                10,
                "a broker holds the lease",
                cluster,
            )
            holder.kill(signal.SIGKILL)
            answers = await asyncio.gather(
                *(c.chat(f"after {i}", max_tokens=10) for i, c in enumerate((a, b, a, b)))
            )
            assert answers == [f"Echo: after {i}" for i in range(4)]
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())
    assert all("lease granted, epoch" in b.log() for b in brokers)


def test_the_gateway_serves_a_v3_room_unchanged(room: Cluster) -> None:
    """The gateway's Client picks protocol 3 by itself: the OpenAI SDK gets its answers."""
    _, base = room.gateway("--room", ROOM, data=True)
    sdk = OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=30)
    reply = sdk.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "through the gateway"}]
    )
    assert reply.choices[0].message.content == "Echo: through the gateway"
    stream = sdk.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "streamed too"}], stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "Echo: streamed too"


def test_a_secure_market_with_its_broker_key_and_invitations(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``igora market --secure --members invite``: every room speaks protocol 3, only the
    identity given with ``--broker-key`` may broker, and the broker, the worker and the
    asker join with one invitation of the operator (``--invite``, ``Client(invite=)``);
    an agent without one is refused."""
    data = str(cluster.data)
    made = subprocess.run(
        [sys.executable, "-m", "igora", "market", "invite", "--uses", "3", "--data", data],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    code = made.stdout.strip().splitlines()[-1]
    assert code.startswith("igora-invite:"), made.stdout
    broker_id = load_identity(Path(cluster.agent_data("b1")["IGORA_DATA"]))[0].id
    cluster.market("--secure", "--members", "invite", "--broker-key", broker_id)
    cluster.broker("--invite", code, name="b1", data=True)
    intruder = cluster.broker(name="b2", data=True)  # no invitation: not admitted
    cluster.worker("--invite", code, name="w1", data=True)
    cluster.wait_agents("worker", 1)

    async def main() -> None:
        monkeypatch.setenv("IGORA_DATA", cluster.agent_data("alice")["IGORA_DATA"])
        async with Client(cluster.url, name="alice", timeout=30, invite=code) as a:
            assert a.v3 is not None
            assert await a.chat("secure room", max_tokens=10) == "Echo: secure room"

    asyncio.run(main())
    wait_until(lambda: "not a member" in intruder.log(), 20, intruder.log)
    assert "lease granted" not in intruder.log()


def test_an_asker_gone_gets_its_task_stopped(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An asker that leaves without reading its answer: the broker marks its task in the
    worker's inbox, the worker ends the run aborted and takes the next task."""
    _, workers = v3_room(cluster, *SLOW)

    async def main() -> None:
        a, b = await connected(cluster, monkeypatch)
        try:
            task = await a.submit(words(300, "z"))
            await wait_for(lambda: a.worker_of(task.id), 10, "the task assigned", cluster)
            assert a.v3 is not None
            await a.v3.session.stop()  # gone, as a killed process would be
            await wait_for(
                lambda: any(f"task {task.id} aborted" in w.log() for w in workers),
                20,
                "the worker ended the run aborted",
                cluster,
            )
            assert await b.chat("still served", max_tokens=10) == "Echo: still served"
        finally:
            await b.close()

    asyncio.run(main())


def test_an_engine_down_hands_the_task_to_another_worker_or_fails_with_its_reason(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """v2's hand-back rule in a v3 room: a worker whose upstream answers 503 hands the
    task back (its run ``handback``, its advert ``busy``); the broker gives it to another
    worker serving the model, or, with none, ends it failed with the engine's reason."""
    stub = Stub().start()
    try:
        cluster.market("--v3-room", ROOM)
        cluster.broker("--room", ROOM, name="b1", data=True)
        for name, model, slots in (
            ("bad", "e503=flaky", "3"),  # most free slots: picked first
            ("good", "ok=flaky", "1"),
            ("lonely", "e503=lonely", "1"),
        ):
            cluster.worker(
                "--room", ROOM, "--no-warmup", "--base-url", stub.url, "--model", model,
                "--slots", slots, name=name, engine="openai", data=True,
            )  # fmt: skip
        cluster.wait_agents("worker", 3)

        async def main() -> None:
            monkeypatch.setenv("IGORA_DATA", cluster.agent_data("alice")["IGORA_DATA"])
            async with Client(cluster.url, ROOM, name="alice", timeout=30) as a:
                # the three adverts in dir (who, which wait_agents reads, may come first)
                await wait_for(lambda: len(a.workers()) == 3, 10, "three adverts", cluster)
                answer = await (await a.submit("Hi", model="flaky")).result()
                assert answer.text == "Hello from the stub"
                with pytest.raises(TaskFailed, match="HTTP 503: stub: overloaded"):
                    await a.chat("Hi", model="lonely")

        asyncio.run(main())
        bad = next(p for p in cluster.procs if p.log_path.name.endswith("-bad.log"))
        assert "handed back" in bad.log()
    finally:
        stub.stop()


def test_a_worker_that_came_after_the_task_gets_a_late_grant(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task whose only candidate is busy goes to a worker that came after it was put:
    the asker grants that worker the task key then (protocol-v3.md §7.2)."""
    cluster.market("--v3-room", ROOM)
    cluster.broker("--room", ROOM, name="b1", data=True)
    cluster.worker("--room", ROOM, *SLOW, name="w1", data=True)
    cluster.wait_agents("worker", 1)
    cluster.wait_agents("broker", 1)

    async def main() -> None:
        a = asker(cluster, "alice", monkeypatch)
        await a.connect()
        try:
            assert a.v3 is not None
            first = await a.submit(words(100, "z"))  # keeps w1's one slot for 5 s
            w1 = await wait_for(lambda: a.worker_of(first.id), 10, "first task assigned", cluster)
            task = await a.submit("granted late")
            assert a.v3._tracks[task.id].header["candidates"] == [w1]
            assert set(a.v3._tracks[task.id].granted) == {w1}
            w2 = cluster.worker("--room", ROOM, name="w2", data=True)
            answer = await task.result()
            assert answer.text == "Echo: granted late"
            assert f"task {task.id} started" in w2.log()
            assert (await first.result()).text == f"Echo: {words(100, 'z')}"
        finally:
            await a.close()

    asyncio.run(main())


def test_a_worker_restarted_with_its_identity_gets_a_new_grant(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The only worker is killed mid-task and, once the broker took the task back,
    started again from its data folder: same id, new session key. The task's attempt 2
    goes to it, and the asker seals the task key again to its new key (the grant it had
    opens no more; the worker waits for the new one)."""
    cluster.market("--v3-room", ROOM)
    broker = cluster.broker("--room", ROOM, name="b1", data=True)
    first = cluster.worker("--room", ROOM, *SLOW, name="w1", data=True)
    cluster.wait_agents("worker", 1)
    cluster.wait_agents("broker", 1)

    async def main() -> None:
        a = asker(cluster, "alice", monkeypatch)
        await a.connect()
        try:
            prompt = words(30, "r")
            task = await a.submit(prompt)
            await wait_for(lambda: f"task {task.id} started" in first.log(), 10, "started", cluster)
            first.kill(signal.SIGKILL)
            await wait_for(lambda: "re-queued" in broker.log(), 10, "task re-queued", cluster)
            again = cluster.worker("--room", ROOM, *SLOW, name="w1", data=True)
            answer = await task.result()
            assert answer.text == f"Echo: {prompt}"
            assert f"task {task.id} started (attempt 2)" in again.log()
        finally:
            await a.close()

    asyncio.run(main())


def test_a_gateway_started_before_its_market_serves_the_v3_room_once_it_is_up(
    cluster: Cluster,
) -> None:
    """A gateway (its Client's ``start``) and a worker started while no market answers
    wait for it and decide the room's protocol when it does: they were taken for version
    2 agents, which a v3 room refuses (4426) at every reconnection, for ever."""
    port = free_port()
    gateway = cluster.spawn(
        "gateway",
        "--market",
        cluster.url,
        "--room",
        ROOM,
        "--port",
        str(port),
        name="gw",
        env=cluster.agent_data("gw"),
    )
    early = cluster.worker("--room", ROOM, name="w1", data=True)
    health = f"http://127.0.0.1:{port}/health"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the gateway serves HTTP (503: no market yet)
        try:
            urllib.request.urlopen(health, timeout=2)
        except urllib.error.HTTPError as exc:
            assert exc.code == 503
            break
        except OSError:
            time.sleep(0.2)
    time.sleep(1.0)
    cluster.market("--v3-room", ROOM)
    cluster.broker("--room", ROOM, name="b1", data=True)
    sdk = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)

    def answered() -> str | None:
        try:
            reply = sdk.chat.completions.create(
                model="echo", messages=[{"role": "user", "content": "late market"}], timeout=10
            )
        except openai.APIStatusError as exc:
            assert exc.status_code == 503, exc  # not connected yet, or no worker yet
            return None
        return reply.choices[0].message.content

    deadline = time.monotonic() + 30
    while (text := answered()) is None and time.monotonic() < deadline:
        time.sleep(0.3)
    assert text == "Echo: late market"
    assert "speaks Igora protocol 3" not in gateway.log() + early.log()
    assert "waiting for it" in early.log()
