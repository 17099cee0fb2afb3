"""Chaos: malformed and hostile entries written straight into the shared document.

A raw agent (no Igora client logic) writes wrong values into every map; each one is
rejected or ended with a log line, and the broker, the worker and an honest client keep
working. One market for the whole module: a case that broke a process would show in the
cases after it too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pycrdt import Doc, Map, Text, YMessageType, YSyncMessageType
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from igora import Client, Restart, TaskFailed
from igora.agent import Agent
from igora.protocol import MAX_ID, MAX_TEXT, MapName, State, TaskField, new_id

from .conftest import Cluster
from .faults import observer, put, raw_task, wait_for

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def market(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("entries"))
    c.market()
    c.broker("--claim-timeout", "3")
    c.worker("--slots", "2", "--delay", "0.02", name="w")
    c.wait_agents("worker", 1)
    c.wait_agents("broker", 1)
    yield c
    c.stop()


@pytest.fixture
async def raw(market: Cluster) -> Any:
    async with observer(market, "hostile") as agent:
        yield agent


async def still_serving(market: Cluster) -> None:
    """Broker and worker alive, and an honest task answered."""
    broker, worker = market.procs[1], market.procs[2]
    assert broker.alive() and worker.alive() and market.procs[0].alive()
    async with Client(market.url) as client:
        assert await client.chat("still fine?", timeout=30) == "Echo: still fine?"
    assert "Traceback" not in broker.log() + worker.log() + market.procs[0].log()


def deep(n: int) -> list[Any]:
    top: list[Any] = []
    cur = top
    for _ in range(n):
        nxt: list[Any] = []
        cur.append(nxt)
        cur = nxt
    return top


def ok(key: str, **extra: Any) -> dict[str, Any]:
    return {TaskField.ID: key, TaskField.PROMPT: "x", TaskField.STATE: State.TODO.value, **extra}


BAD_TODOS: dict[str, Callable[[str], Any]] = {
    "a string": lambda k: "hello",
    "a number": lambda k: 42,
    "a list": lambda k: [1, 2, 3],
    "null": lambda k: None,
    "a shared map": lambda k: Map({TaskField.ID: k, TaskField.PROMPT: "x"}),
    "a shared text": lambda k: Text("x"),
    "no id": lambda k: {TaskField.PROMPT: "x"},
    "no prompt": lambda k: {TaskField.ID: k},
    "id of another key": lambda k: ok(new_id()),
    "prompt not a string": lambda k: {TaskField.ID: k, TaskField.PROMPT: 42},
    "temperature a word": lambda k: ok(k, temperature="hot"),
    "temperature NaN": lambda k: ok(k, temperature=float("nan")),
    "messages not a list": lambda k: {TaskField.ID: k, TaskField.MESSAGES: "hi"},
    "message without role": lambda k: {TaskField.ID: k, TaskField.MESSAGES: [{"content": "hi"}]},
    "stop of numbers": lambda k: ok(k, stop=[1, 2]),
    "negative maxTokens": lambda k: ok(k, maxTokens=-5),
    "attempts a word": lambda k: ok(k, attemps="many"),
    "deadline a word": lambda k: ok(k, deadline="soon"),
    "unknown state": lambda k: ok(k, state="exploded"),
    "huge prompt": lambda k: {TaskField.ID: k, TaskField.PROMPT: "x" * (MAX_TEXT + 1)},
    "huge model name": lambda k: ok(k, model="m" * 10_000),
}


@pytest.mark.parametrize("case", list(BAD_TODOS))
async def test_malformed_todo_is_failed_with_a_log_line(
    market: Cluster, raw: Agent, case: str
) -> None:
    key = new_id()
    put(raw, MapName.TODOS, key, BAD_TODOS[case](key))
    done = raw.maps[MapName.DONE]
    final = await wait_for(lambda: done.get(key), 20, f"{case}: the entry is ended", market)
    assert final[TaskField.STATE] == State.FAILED.value and "invalid task" in final[TaskField.ERROR]
    assert key not in raw.maps[MapName.TODOS]
    await wait_for(lambda: key in market.procs[1].log(), 10, "the broker logged it")
    await still_serving(market)


async def test_huge_key_is_failed_with_a_short_log_line(market: Cluster, raw: Agent) -> None:
    key = "k" * (MAX_ID * 50)
    put(raw, MapName.TODOS, key, ok(key))
    done = raw.maps[MapName.DONE]
    final = await wait_for(
        lambda done=done, key=key: done.get(key), 20, "the entry is ended", market
    )
    assert final[TaskField.STATE] == State.FAILED.value
    line = next(ln for ln in market.procs[1].log().splitlines() if key[:80] in ln)
    assert len(line) < 400
    await still_serving(market)


async def test_value_nested_too_deep_is_refused_by_the_market(market: Cluster) -> None:
    # Thousands of levels would make every agent's observers fail at each reconnect.
    async with observer(market, "nester") as nester:
        task = raw_task(nester, "nested", extra=deep(3000))
        put(nester, MapName.TODOS, task[TaskField.ID], task)
        await wait_for(
            lambda: "refused update" in market.procs[0].log(),
            20,
            "the market refuses the frame",
            market,
        )
    async with observer(market, "newcomer") as newcomer:
        assert task[TaskField.ID] not in newcomer.maps[MapName.TODOS]
        assert task[TaskField.ID] not in newcomer.maps[MapName.DONE]
    await still_serving(market)


async def test_crafted_frame_nesting_a_million_levels_does_not_kill_the_market(
    market: Cluster,
) -> None:
    # Hundreds of thousands of levels overflow the native decoder's stack: the process
    # would die. The frame is built by hand (2 bytes per level).
    doc = Doc()
    doc.get(MapName.TODOS.value, type=Map)["k"] = deep(10)
    update = doc.get_update()
    level = bytes([117, 1])  # lib0 Any: an array of one item
    update = update.replace(level * 9, level * 1_000_000, 1)
    frame = (
        bytes([YMessageType.SYNC, YSyncMessageType.SYNC_UPDATE]) + _varuint(len(update)) + update
    )
    async with connect(f"{market.url}/market", max_size=None) as ws:
        await ws.send(frame)
        with pytest.raises(ConnectionClosed):
            while True:
                await asyncio.wait_for(ws.recv(), 10)
    assert "refused update" in market.procs[0].log()
    await still_serving(market)


def _varuint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


async def test_task_prepared_for_a_worker_that_does_not_exist_is_run_by_a_real_one(
    market: Cluster,
    raw: Agent,
) -> None:
    task = raw_task(raw, "orphan", worker=new_id(), state=State.PREPARED.value, attemps=1)
    put(raw, MapName.PREPARED, task[TaskField.ID], task)
    done = raw.maps[MapName.DONE]
    final = await wait_for(lambda: done.get(task[TaskField.ID]), 30, "the task ends", market)
    assert (
        final[TaskField.STATE] == State.DONE.value and final[TaskField.RESPONSE] == "Echo: orphan"
    )
    assert "re-queued" in market.procs[1].log()


async def test_task_in_doing_claiming_a_live_worker_that_never_took_it_is_handed_back(
    market: Cluster,
    raw: Agent,
) -> None:
    worker_id = next(p.id for p in raw.peers() if p.type == "worker")
    task = raw_task(raw, "forged doing", worker=worker_id, state=State.DOING.value, attemps=1)
    put(raw, MapName.DOING, task[TaskField.ID], task)
    done = raw.maps[MapName.DONE]
    final = await wait_for(lambda: done.get(task[TaskField.ID]), 30, "the task ends", market)
    assert (
        final[TaskField.STATE] == State.DONE.value
        and final[TaskField.RESPONSE] == "Echo: forged doing"
    )
    assert "not running it; handed back" in market.procs[2].log()


async def test_running_task_whose_doing_entry_is_deleted_ends_failed_within_seconds(
    market: Cluster,
    raw: Agent,
) -> None:
    # A hostile (or buggy) agent deletes the entry of a running task, writing it nowhere
    # else: its worker ends it failed at once, rather than let its client wait 60 s.
    async with Client(market.url) as client:
        task = await client.submit("#repeat 2000", timeout=60)  # 40 s of tokens
        doing = raw.maps[MapName.DOING]
        running = await wait_for(lambda: doing.get(task.id), 20, "the task runs", market)
        streams = raw.maps[MapName.STREAMS]
        await wait_for(
            lambda: "tok2" in str(streams.get(running[TaskField.STREAM], "")),
            20,
            "the first tokens",
            market,
        )
        with raw.transaction():
            del doing[task.id]
        with pytest.raises(TaskFailed) as failed:
            await asyncio.wait_for(task.result(), 10)
    final = failed.value.task
    assert final[TaskField.STATE] == State.FAILED.value
    assert (
        final[TaskField.ERROR]
        == "the task's entry in doing was deleted by another agent while it ran"
    )
    assert final[TaskField.RESPONSE].startswith("tok0 tok1 ")
    assert task.id not in doing
    await wait_for(
        lambda: all(w.get("running") == 0 for w in market.agents("worker")),
        10,
        "the worker's slot is free",
        market,
    )
    assert "its entry in doing was deleted" in market.procs[2].log()
    await still_serving(market)


@pytest.mark.parametrize("where", [MapName.PREPARED, MapName.DOING])
async def test_garbage_in_prepared_or_doing_is_failed(
    market: Cluster, raw: Agent, where: MapName
) -> None:
    worker_id = next(p.id for p in raw.peers() if p.type == "worker")
    for value in ("junk", {TaskField.ID: "x", TaskField.WORKER: worker_id, TaskField.PROMPT: 5}):
        key = new_id()
        if isinstance(value, dict):
            value = {**value, TaskField.ID: key}
        put(raw, where, key, value)
        done = raw.maps[MapName.DONE]
        final = await wait_for(
            lambda done=done, key=key: done.get(key), 20, "the entry is ended", market
        )
        assert (
            final[TaskField.STATE] == State.FAILED.value
            and "invalid task" in final[TaskField.ERROR]
        )
    await still_serving(market)


async def test_forged_end_of_someone_elses_running_task_does_not_fool_its_client(
    market: Cluster,
    raw: Agent,
) -> None:
    expected = "".join(f"tok{i} " for i in range(60))
    async with Client(market.url) as client:
        task = await client.submit("#repeat 60", timeout=30)
        doing = raw.maps[MapName.DOING]
        await wait_for(lambda: task.id in doing, 20, "the task runs", market)
        put(
            raw,
            MapName.DONE,
            task.id,
            {
                TaskField.ID: task.id,
                TaskField.STATE: State.DONE.value,
                TaskField.RESPONSE: "forged answer",
            },
        )
        put(raw, MapName.DONE, task.id, {TaskField.ID: task.id, TaskField.STATE: State.DOING.value})
        pieces = [p async for p in task.stream()]
    assert not any(isinstance(p, Restart) for p in pieces)
    assert "".join(pieces) == expected
    assert task.final is not None and task.final[TaskField.RESPONSE] == expected


async def test_garbage_in_streams_is_ignored_and_cleaned(market: Cluster, raw: Agent) -> None:
    expected = "".join(f"tok{i} " for i in range(60))
    junk = ["junk", "#", "x#y", "z" * 5000, f"{new_id()}#7"]
    async with Client(market.url) as client:
        task = await client.submit("#repeat 60", timeout=30)
        doing = raw.maps[MapName.DOING]
        running = await wait_for(lambda: doing.get(task.id), 20, "the task runs", market)
        with raw.transaction():
            for i, key in enumerate(junk):
                raw.maps[MapName.STREAMS][key] = [i, "junk"] if i % 2 else Text("junk")
            # Even the running task's own stream is replaced by garbage.
            raw.maps[MapName.STREAMS][running[TaskField.STREAM]] = "garbage"
        pieces = [p async for p in task.stream()]
    assert not any(isinstance(p, Restart) for p in pieces)
    assert "".join(pieces) == expected  # a clean continuation from the final answer
    streams = raw.maps[MapName.STREAMS]
    await wait_for(
        lambda: not any(k in streams for k in junk),
        20,
        "the active broker removes orphan streams",
        market,
    )
    await still_serving(market)


async def test_garbage_in_done_and_in_awareness_hurts_nobody(market: Cluster, raw: Agent) -> None:
    keys = [new_id() for _ in range(3)]
    with raw.transaction():
        raw.maps[MapName.DONE][keys[0]] = "junk"
        raw.maps[MapName.DONE][keys[1]] = {
            TaskField.ID: keys[1],
            TaskField.STATE: "nonsense",
            "x": deep(40),
        }
        raw.maps[MapName.DONE][keys[2]] = Map({"a": 1})
    # A peer whose awareness fields have every wrong type.
    raw.awareness.set_local_state(
        {
            "id": 5,
            "type": "worker",
            "name": ["x"],
            "style": None,
            "state": 7,
            "models": 5,
            "slots": "many",
            "running": "x",
            "since": "x",
            "leader": "yes",
            "heartbeat": -1,
            "protocol": "2",
        }
    )
    await asyncio.sleep(1)
    await still_serving(market)
    await wait_for(  # the map read anew each time: a compaction replaces the document
        lambda: not any(k in raw.maps[MapName.DONE] for k in keys),
        20,
        "the active broker removes entries of done that are not tasks",
        market,
    )


async def test_fake_worker_that_never_takes_its_tasks_loses_them_to_a_real_one(
    market: Cluster,
) -> None:
    async with observer(market, "hostage-taker") as fake:
        fake.set_state(
            type="worker",
            style="text",
            state="ready",
            slots=8,
            running=0,
            models=[{"name": "echo"}],
            engine="echo",
        )
        async with Client(market.url) as client:
            await wait_for(lambda: len(client.workers()) == 2, 10, "the fake worker is seen")
            answers = await asyncio.gather(
                *(client.chat(f"hostage {i}", timeout=60) for i in range(6))
            )
    assert answers == [f"Echo: hostage {i}" for i in range(6)]
    log = market.procs[1].log()
    assert f"worker {fake.id} does not take the tasks assigned to it" in log
    assert "did not take it within 3 s" in log
