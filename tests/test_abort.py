"""Abort: the worker stops at the next token and frees its slot, whenever the abort comes.

An abort written while the task moves (the broker assigning it, a worker starting or ending
it) lands on the entry the move has just left; Yjs keeps both writes. The mark belongs to
the task whatever entry it is on (docs/protocol.md, 4.4).
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
from pycrdt import Doc, Map, Text

from igora import Client, TaskAborted
from igora.agent import Agent
from igora.broker import policies
from igora.protocol import ABORTED_MARK, LIVE, MapName, State, TaskField

from .conftest import Cluster
from .faults import final_of, observer, put, raw_task, wait_for
from .market_peers import TcpProxy

pytestmark = pytest.mark.timeout(180)

LONG = "#repeat 400"  # at 0.05 s a token, 20 s: an abort that is lost shows


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
        await wait_for(
            lambda: all(int(w.state.get("running") or 0) == 0 for w in client.workers()),
            5,
            "every worker slot free",
        )


def racing_market(cluster: Cluster, slots: int = 4) -> None:
    cluster.market()
    cluster.broker()
    cluster.worker("--delay", "0.05", "--slots", str(slots), name="w")
    cluster.wait_agents("worker", 1)
    cluster.wait_agents("broker", 1)


class Outcomes:
    """Every task that appears in the room, and the last state written in done for it."""

    def __init__(self, agent: Agent) -> None:
        self.seen: set[str] = set()
        self.final: dict[str, Any] = {}
        agent.observe_keys(MapName.TODOS, self._on_todos)
        agent.observe_keys(MapName.DONE, self._on_done)

    def _on_todos(self, changes: dict[str, dict[str, Any]]) -> None:
        self.seen.update(k for k, c in changes.items() if c.get("action") != "delete")

    def _on_done(self, changes: dict[str, dict[str, Any]]) -> None:
        for key, change in changes.items():
            value = change.get("newValue")
            if isinstance(value, dict):
                self.final[key] = value.get(TaskField.STATE)

    def all_ended(self) -> bool:
        return bool(self.seen) and all(t in self.final for t in self.seen)


async def settled(cluster: Cluster, agent: Agent, outcomes: Outcomes) -> None:
    """Every task ended, no slot busy, no entry left in todos, prepared or doing: checked
    twice 1.5 s apart, so that a task running on after its abort (20 s) shows."""

    def quiet() -> bool:
        return (
            outcomes.all_ended()
            and all(w.get("running") == 0 for w in cluster.agents("worker"))
            and not any(len(agent.maps[m]) for m in LIVE)
        )

    for _ in range(2):
        await wait_for(quiet, 30, "every task ended, every slot free, no entry left", cluster)
        await asyncio.sleep(1.5)


def lost_aborts(outcomes: Outcomes) -> dict[str, Any]:
    return {
        t: outcomes.final.get(t)
        for t in outcomes.seen
        if outcomes.final.get(t) != State.ABORTED.value
    }


async def test_aborts_racing_the_assignment_all_end_aborted(cluster: Cluster) -> None:
    # A distant client (50 ms each way) aborts each of its tasks 0 to 300 ms after putting
    # it on the market: many aborts are written on the todos entry after the broker moved
    # it (or on prepared after the worker started it). Each must end the task.
    racing_market(cluster)
    proxy = TcpProxy(cluster.port, delay=0.05)
    await proxy.start()
    try:
        async with observer(cluster, "seer") as seer:
            outcomes = Outcomes(seer)
            async with Client(f"ws://127.0.0.1:{proxy.port}") as client:
                tasks = [await client.submit(LONG, timeout=120) for _ in range(30)]

                async def abort_later(task: Any) -> None:
                    await asyncio.sleep(random.random() * 0.3)
                    task.abort()

                await asyncio.gather(*(abort_later(t) for t in tasks))
                await settled(cluster, seer, outcomes)
        assert len(outcomes.seen) == 30
        assert lost_aborts(outcomes) == {}
    finally:
        await proxy.stop()
    assert "Traceback" not in cluster.logs(tail=100_000)


def _stream_request(port: int) -> socket.socket:
    body = json.dumps(
        {
            "model": "echo",
            "stream": True,
            "messages": [{"role": "user", "content": LONG}],
        }
    ).encode()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    )
    return s


async def test_streamed_requests_whose_clients_leave_at_once_all_end_aborted(
    cluster: Cluster,
) -> None:
    # The recipe: six streamed requests through the gateway, their sockets closed
    # at once, round after round, at varied moments of their assignment.
    racing_market(cluster, slots=1)
    _, base = cluster.gateway("--heartbeat", "1", timeout=30)
    port = urlsplit(base).port or 0
    async with observer(cluster, "seer") as seer:
        outcomes = Outcomes(seer)
        for round_ in range(10):
            sockets = [_stream_request(port) for _ in range(6)]
            await asyncio.sleep(0.01 * round_)
            for s in sockets:
                s.close()
            await asyncio.sleep(0.3)
        await settled(cluster, seer, outcomes)
    assert len(outcomes.seen) == 60
    assert lost_aborts(outcomes) == {}
    assert "Traceback" not in cluster.logs(tail=100_000)


# ------------------------------------------------------------- exact interleavings
# A second copy of the document, forked before a move, writes the abort mark after the
# move happened: exactly what a peer that had not heard of the move yet does.


def fork(agent: Agent) -> tuple[Doc, dict[MapName, Map]]:
    doc = Doc()
    doc.apply_update(agent.doc.get_update())
    return doc, {m: doc.get(m.value, type=Map) for m in (*LIVE, MapName.DONE)}


def write_from_fork(
    agent: Agent, doc: Doc, maps: dict[MapName, Map], where: MapName, key: str
) -> None:
    """Mark ``maps[where][key]`` aborted in the fork and send that write through ``agent``."""
    before = doc.get_state()
    maps[where][key] = {**maps[where][key], TaskField.ABORTED: ABORTED_MARK}
    agent.doc.apply_update(doc.get_update(before))


def located(agent: Agent, key: str) -> MapName | None:
    for m in reversed(LIVE):
        if key in agent.maps[m]:
            return m
    return None


RACES: dict[str, tuple[MapName, str, Callable[[MapName | None], bool]]] = {
    # name: (entry marked, prompt, when the move it races with has happened)
    "abort on todos after the broker assigned it": (
        MapName.TODOS,
        LONG,
        lambda at: at in (MapName.PREPARED, MapName.DOING),
    ),
    "abort on prepared after the worker started it": (
        MapName.PREPARED,
        LONG,
        lambda at: at is MapName.DOING,
    ),
}


@pytest.mark.parametrize("race", list(RACES))
async def test_abort_written_on_an_entry_the_task_just_left_ends_it(
    cluster: Cluster, race: str
) -> None:
    where, prompt, moved = RACES[race]
    racing_market(cluster)
    async with observer(cluster, "racer") as racer:
        worker_id = next(p.id for p in racer.peers() if p.type == "worker")
        task = raw_task(racer, prompt)
        if where is MapName.PREPARED:  # as the broker writes it
            task.update(
                {
                    TaskField.WORKER: worker_id,
                    TaskField.STATE: State.PREPARED.value,
                    TaskField.ATTEMPTS: 1,
                }
            )
        put(racer, where, task[TaskField.ID], task)
        doc, maps = fork(racer)
        await wait_for(lambda: moved(located(racer, task[TaskField.ID])), 20, "the move", cluster)
        write_from_fork(racer, doc, maps, where, task[TaskField.ID])
        final = await wait_for(
            lambda: (
                (f := final_of(racer, task[TaskField.ID]))
                and located(racer, task[TaskField.ID]) is None
                and f
            ),
            10,
            "the task ends, no entry left",
            cluster,
        )
        assert final[TaskField.STATE] == State.ABORTED.value
        await wait_for(
            lambda: [w.get("running") for w in cluster.agents("worker")] == [0],
            10,
            "the worker's slot is free",
            cluster,
        )
        await asyncio.sleep(1.5)  # nothing brings it back, nothing ends it otherwise
        assert located(racer, task[TaskField.ID]) is None
        assert final_of(racer, task[TaskField.ID])[TaskField.STATE] == State.ABORTED.value
    worker_log = cluster.procs[2].log()
    assert f"task {task[TaskField.ID]} done" not in worker_log


async def test_abort_written_as_the_task_ends_leaves_its_end_alone(
    cluster: Cluster,
) -> None:
    # Too late: the task ended while the mark was on its way. The end stands, and the entry
    # the mark brought back to doing is dropped.
    racing_market(cluster)
    async with observer(cluster, "racer") as racer:
        task = raw_task(racer, "#repeat 20")
        put(racer, MapName.TODOS, task[TaskField.ID], task)
        await wait_for(
            lambda: located(racer, task[TaskField.ID]) is MapName.DOING, 20, "it runs", cluster
        )
        doc, maps = fork(racer)
        await wait_for(lambda: final_of(racer, task[TaskField.ID]), 20, "it ends", cluster)
        write_from_fork(racer, doc, maps, MapName.DOING, task[TaskField.ID])
        assert located(racer, task[TaskField.ID]) is MapName.DOING  # the ghost
        await wait_for(
            lambda: located(racer, task[TaskField.ID]) is None, 10, "the ghost goes", cluster
        )
        final = final_of(racer, task[TaskField.ID])
        assert final is not None and final[TaskField.STATE] == State.DONE.value
        assert final[TaskField.RESPONSE] == "".join(f"tok{i} " for i in range(20))


# ------------------------------------------------------------- the rules, without processes

WORKER, ASKER = "worker-1", "asker-1"


def _task(tid: str, state: State, marked: bool = False) -> dict[str, Any]:
    task: dict[str, Any] = {
        TaskField.ID: tid,
        TaskField.PROMPT: "x",
        TaskField.ASKER: ASKER,
        TaskField.STATE: state.value,
    }
    if state is not State.TODO:
        task.update({TaskField.WORKER: WORKER, TaskField.ATTEMPTS: 1, TaskField.START: 1})
    if state is State.DOING:
        task[TaskField.STREAM] = f"{tid}#1"
    if marked:
        task[TaskField.ABORTED] = ABORTED_MARK
    return task


def _snapshot(now: int, **entries: dict[str, Any]) -> policies.Snapshot:
    maps: dict[str, dict[str, Any]] = {"todos": {}, "prepared": {}, "doing": {}}
    for where, task in entries.items():
        maps[where][task[TaskField.ID]] = task
    return policies.Snapshot(maps["todos"], maps["prepared"], maps["doing"], now=now)


# name: (entries under one id (map -> marked), worker present, ms since the mark was first
#        seen, expected (source, target, state written, stale maps) or None)
ABORT_CASES: dict[str, tuple[dict[str, bool], bool, int, Any]] = {
    "mark on todos, task assigned since": (
        {"todos": True, "prepared": False},
        True,
        0,
        (MapName.PREPARED, MapName.DONE, State.ABORTED, (MapName.TODOS,)),
    ),
    "mark on prepared, task re-queued since": (
        {"todos": False, "prepared": True},
        True,
        0,
        (MapName.PREPARED, MapName.DONE, State.ABORTED, (MapName.TODOS,)),
    ),
    "mark on prepared, task started since: its worker's to end": (
        {"prepared": True, "doing": False},
        True,
        0,
        None,
    ),
    "mark on prepared, task still running 1 s later: told its worker": (
        {"prepared": True, "doing": False},
        True,
        1001,
        (None, MapName.DOING, None, (MapName.PREPARED,)),
    ),
    "mark on todos, task running on a worker that is gone": (
        {"todos": True, "doing": False},
        False,
        0,
        (MapName.DOING, MapName.DONE, State.ABORTED, (MapName.TODOS,)),
    ),
    "mark on doing, a stale entry in todos": (
        {"todos": False, "doing": True},
        True,
        0,
        (None, None, None, (MapName.TODOS,)),
    ),
    "mark on doing, worker did not stop in 10 s": (
        {"doing": True},
        True,
        10_001,
        (MapName.DOING, MapName.DONE, State.ABORTED, ()),
    ),
    "no mark": ({"todos": False, "prepared": False}, True, 0, None),
}


@pytest.mark.parametrize("case", list(ABORT_CASES))
def test_a_mark_on_any_entry_aborts_the_task(case: str) -> None:
    copies, worker_present, waited, expected = ABORT_CASES[case]
    states = {"todos": State.TODO, "prepared": State.PREPARED, "doing": State.DOING}
    snap = _snapshot(100_000, **{m: _task("t", states[m], marked) for m, marked in copies.items()})
    seen = {"t": 100_000 - waited} if waited else {}
    moves = policies.abort(snap, lambda who: who == ASKER or worker_present, seen)
    if expected is None:
        assert moves == []
        return
    source, target, state, stale = expected
    [move] = moves
    assert (move.source, move.target, move.stale) == (source, target, stale)
    if target is MapName.DOING:
        assert move.task is not None and move.task[TaskField.ABORTED] == ABORTED_MARK
    elif target is MapName.DONE:
        assert move.task is not None and move.task[TaskField.STATE] == state.value
        assert move.task[TaskField.ABORTED] == ABORTED_MARK


def test_unmarked_entries_left_by_a_race_are_removed_but_the_most_advanced() -> None:
    snap = _snapshot(1, todos=_task("t", State.TODO), doing=_task("t", State.DOING))
    [move] = policies.stale_copies(snap)
    assert (move.source, move.target, move.stale) == (None, None, (MapName.TODOS,))
    assert policies.stale_copies(_snapshot(1, todos=_task("t", State.TODO))) == []


class _Worker:
    """A Worker on a document fed by hand (no market, no process): what it makes of the
    updates it receives."""

    def __init__(self) -> None:
        from igora.config import market_address
        from igora.engines.echo import EchoEngine
        from igora.worker.worker import Running, Worker

        self.agent = Agent(
            market_address("ws://127.0.0.1:9"), type="worker", name="w", style="text"
        )
        self.worker = Worker(self.agent, EchoEngine())
        self.peer = Doc()
        self.maps = {
            m: self.peer.get(m.value, type=Map) for m in (*LIVE, MapName.DONE, MapName.STREAMS)
        }
        self.run = Running("t", 1)
        task = {**_task("t", State.DOING), TaskField.WORKER: self.agent.id}
        with self.peer.transaction():
            self.maps[MapName.DOING]["t"] = task
            self.maps[MapName.STREAMS]["t#1"] = Text("tok0 ")
        self.agent.doc.apply_update(self.peer.get_update())
        self.worker.running["t"] = self.run

    def receive(self, *writes: Callable[[dict[MapName, Map]], None]) -> str | None:
        """Apply ``writes`` (each one transaction of another peer), relayed as one update
        as the market does with a backlog; return why the worker stopped its task."""
        before = self.peer.get_state()
        for write in writes:
            with self.peer.transaction():
                write(self.maps)
        self.agent.doc.apply_update(self.peer.get_update(before))
        return self.run.stop_reason


def _delete(where: MapName, key: str = "t") -> Callable[[dict[MapName, Map]], None]:
    return lambda maps: maps[where].pop(key)


def _write(where: MapName, **fields: Any) -> Callable[[dict[MapName, Map]], None]:
    return lambda maps: maps[where].__setitem__("t", {**_task("t", State.TODO), **fields})


WORKER_CASES: dict[str, tuple[list[Callable[[dict[MapName, Map]], None]], str | None]] = {
    "doing entry deleted, nothing else": ([_delete(MapName.DOING)], "deleted"),
    "re-queued by the broker": (
        [
            lambda m: (
                _delete(MapName.DOING)(m),
                _delete(MapName.STREAMS, "t#1")(m),
                _write(MapName.TODOS)(m),
            )
        ],
        "lost",
    ),
    "re-queued, run elsewhere, ended and read, relayed as one update": (
        [
            lambda m: (
                _delete(MapName.DOING)(m),
                _delete(MapName.STREAMS, "t#1")(m),
                _write(MapName.TODOS)(m),
            ),
            lambda m: (
                _delete(MapName.TODOS)(m),
                _write(MapName.DONE, state="done")(m),
            ),
            _delete(MapName.DONE),
        ],
        "lost",
    ),
    "ended by the broker (deadline)": (
        [
            lambda m: (
                _delete(MapName.DOING)(m),
                _write(MapName.DONE, state="failed")(m),
            )
        ],
        "lost",
    ),
    "mark on a stale entry in todos": (
        [_write(MapName.TODOS, aborted=ABORTED_MARK)],
        "aborted",
    ),
    "mark in done (ended aborted while starting)": (
        [_write(MapName.DONE, state="aborted", aborted=ABORTED_MARK)],
        "aborted",
    ),
    "forged end in done, no mark": ([_write(MapName.DONE, state="done")], None),
}


@pytest.mark.parametrize("case", list(WORKER_CASES))
async def test_worker_tells_a_deleted_entry_from_a_move_and_sees_marks_anywhere(
    case: str,
) -> None:
    writes, reason = WORKER_CASES[case]
    assert _Worker().receive(*writes) == reason
