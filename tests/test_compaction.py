"""Compaction of a room (igora.market.compaction): the document a newcomer downloads stays
small, and peers holding the full history, Python or the original JavaScript stack, keep
merging with the compacted market.

The first tests run the compaction on pycrdt documents exchanging updates as agents do
through a market; the last ones run real processes (market, node yjs peers, Python
agents) and restart the market from its store."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pycrdt import Doc, Map, Text

from igora import Client
from igora.market.compaction import COMPACT_PAUSE, compact
from igora.protocol import MapName, State, TaskField
from igora.updates import parse

from .conftest import Cluster
from .faults import by_name, worker_name
from .market_peers import NodePeer, agent, ensure_node_modules, until

MAPS = [m.value for m in MapName]


def room() -> Doc:
    doc = Doc()
    for m in MAPS:
        doc.get(m, type=Map)
    return doc


def view(doc: Doc) -> dict[str, dict[str, Any]]:
    return {
        m: {k: str(v) if isinstance(v, Text) else v for k, v in doc.get(m, type=Map).items()}
        for m in MAPS
    }


def sync(*docs: Doc) -> None:
    for a in docs:
        for b in docs:
            if a is not b:
                b.apply_update(a.get_update(b.get_state()))


def lifecycle(
    client: Doc,
    broker: Doc,
    worker: Doc,
    market: Doc,
    ids: list[str],
    answer: str = "tok ",
    requeue: bool = False,
) -> None:
    """Tasks through the maps as Igora's agents move them, each change synced."""
    docs = (market, client, broker, worker)
    m = {(d, name): d.get(name, type=Map) for d in docs[1:] for name in MAPS}
    for tid in ids:
        m[client, "todos"][tid] = {"id": tid, "prompt": "p"}
        sync(*docs)
        with broker.transaction():
            m[broker, "prepared"][tid] = {"id": tid}
            del m[broker, "todos"][tid]
        sync(*docs)
        if requeue:  # the worker vanished: back to todos, the same key again
            with broker.transaction():
                m[broker, "todos"][tid] = {"id": tid, "attempt": 2}
                del m[broker, "prepared"][tid]
            sync(*docs)
            with broker.transaction():
                m[broker, "prepared"][tid] = {"id": tid, "attempt": 2}
                del m[broker, "todos"][tid]
            sync(*docs)
        text = Text()
        with worker.transaction():
            m[worker, "doing"][tid] = {"id": tid}
            del m[worker, "prepared"][tid]
            m[worker, "streams"][f"{tid}#1"] = text
        for _ in range(5):
            text += answer
            sync(*docs)
        with worker.transaction():
            m[worker, "done"][tid] = {"id": tid, "response": str(text)}
            del m[worker, "doing"][tid]
        sync(*docs)
        with client.transaction():
            del m[client, "done"][tid]
            del m[client, "streams"][f"{tid}#1"]
        sync(*docs)


def rebuilt(update: bytes, like: Doc) -> Doc:
    doc = Doc(client_id=like.client_id)
    doc.apply_update(update)
    for name in MAPS:
        doc.get(name, type=Map)
    return doc


def test_finished_tasks_are_collected_and_peers_with_history_keep_merging() -> None:
    client, broker, worker, market = room(), room(), room(), room()
    lifecycle(client, broker, worker, market, [f"a{i:03d}" for i in range(200)])
    lifecycle(client, broker, worker, market, [f"r{i:03d}" for i in range(20)], requeue=True)
    # Live work the compaction must keep: a waiting task, a running one with its stream
    # (non-ASCII: Yjs counts string lengths in UTF-16 units), a task back in todos.
    client.get("todos", type=Map)["live"] = {"id": "live", "prompt": "¿qué tal? 🙂"}
    running = Text("déjà 🚀 ")
    with worker.transaction():
        worker.get("doing", type=Map)["run"] = {"id": "run"}
        worker.get("streams", type=Map)["run#1"] = running
    running += "Ω"
    sync(market, client, broker, worker)
    state = market.get_update()

    marked = compact(state)  # everything dead at once
    assert marked.collected > 200 * 5
    assert len(marked.update) < len(state) / 20, (len(marked.update), len(state))
    fresh = rebuilt(marked.update, market)
    assert view(fresh) == view(market)
    assert view(fresh)["streams"]["run#1"] == "déjà 🚀 Ω"

    # The old peers go on with the compacted market; a newcomer joins it.
    lifecycle(client, broker, worker, fresh, [f"b{i:03d}" for i in range(30)], answer="é🙂 ")
    running += " fin"
    newcomer = rebuilt(fresh.get_update(), room())
    assert view(newcomer) == view(client) == view(fresh)
    # The newcomer takes the broker's part: its writes reach the old peers and back.
    lifecycle(client, newcomer, worker, fresh, [f"c{i:03d}" for i in range(30)], requeue=True)
    sync(fresh, client, broker, worker, newcomer)
    assert view(newcomer) == view(client) == view(broker) == view(worker) == view(fresh)
    assert view(fresh)["streams"]["run#1"] == "déjà 🚀 Ω fin"
    assert set(view(fresh)["todos"]) == {"live"}


def test_a_key_is_collected_only_once_it_was_already_dead_at_the_previous_compaction() -> None:
    client, broker, worker, market = room(), room(), room(), room()
    lifecycle(client, broker, worker, market, ["old1", "old2"])
    first = compact(market.get_update(), spared=set())
    assert first.collected == 0
    assert first.dead == {"old1", "old2"}
    lifecycle(client, broker, worker, market, ["new1"])
    second = compact(market.get_update(), spared=first.dead)
    assert second.collected > 0
    # old1/old2 are gone from the encoding; new1's entries are kept, for the next time.
    keys = {s.key for s in parse(second.update).structs if s.key is not None}
    assert not keys & {"old1", "old2", "old1#1", "old2#1"}
    assert {"new1", "new1#1"} <= keys
    assert second.dead == {"new1"}


def test_a_key_in_use_again_keeps_its_whole_history() -> None:
    client, broker, worker, market = room(), room(), room(), room()
    lifecycle(client, broker, worker, market, ["t1"])
    client.get("todos", type=Map)["t1"] = {"id": "t1", "again": True}  # re-used: live again
    sync(market, client, broker, worker)
    result = compact(market.get_update())
    assert "t1" not in result.dead
    fresh = rebuilt(result.update, market)
    broker.get("todos", type=Map)["t1"] = {"id": "t1", "third": True}
    sync(fresh, client, broker, worker)
    assert fresh.get("todos", type=Map)["t1"] == {"id": "t1", "third": True}
    assert view(fresh) == view(client)


def test_maps_of_other_applications_in_the_room_are_left_alone() -> None:
    client, broker, worker, market = room(), room(), room(), room()
    lifecycle(client, broker, worker, market, ["t1"])
    settings = client.get("settings", type=Map)
    settings["theme"] = "dark"
    del settings["theme"]  # a key such an application may set again later
    sync(market, client, broker, worker)
    result = compact(market.get_update())
    assert result.collected > 0
    keys = {(s.parent, s.key) for s in parse(result.update).structs if s.key is not None}
    assert ("settings", "theme") in keys and not any(k == "t1" for _, k in keys)


def test_a_running_task_keeps_its_old_keys_so_that_a_requeue_reaches_everyone() -> None:
    """A worker lost after minutes: the broker moves the task back into ``todos``, a key
    whose entry was deleted long ago; its write has that old item as left neighbour."""
    client, broker, worker, market = room(), room(), room(), room()
    lifecycle(client, broker, worker, market, ["gone"])
    client.get("todos", type=Map)["t1"] = {"id": "t1"}
    sync(market, client, broker, worker)
    with broker.transaction():
        broker.get("prepared", type=Map)["t1"] = {"id": "t1"}
        del broker.get("todos", type=Map)["t1"]
    sync(market, client, broker, worker)
    with worker.transaction():
        worker.get("doing", type=Map)["t1"] = {"id": "t1"}
        del worker.get("prepared", type=Map)["t1"]
        worker.get("streams", type=Map)["t1#1"] = Text("half an answer")
    sync(market, client, broker, worker)
    first = compact(market.get_update(), spared=set())
    second = compact(market.get_update(), spared=first.dead)  # two while t1 runs
    assert "t1" not in first.dead | second.dead and second.collected > 0
    fresh = rebuilt(second.update, market)
    newcomer = rebuilt(fresh.get_update(), room())
    with broker.transaction():  # the worker is gone: back to todos, second attempt
        broker.get("todos", type=Map)["t1"] = {"id": "t1", "attempt": 2}
        del broker.get("doing", type=Map)["t1"]
    sync(fresh, client, broker, worker, newcomer)
    assert newcomer.get("todos", type=Map)["t1"] == {"id": "t1", "attempt": 2}
    assert view(newcomer) == view(fresh) == view(broker) == view(client)
    with newcomer.transaction():  # a newcomer broker assigns it again: prepared, re-used
        newcomer.get("prepared", type=Map)["t1"] = {"id": "t1", "attempt": 2}
        del newcomer.get("todos", type=Map)["t1"]
    sync(fresh, client, broker, worker, newcomer)
    assert worker.get("prepared", type=Map)["t1"] == {"id": "t1", "attempt": 2}
    assert view(newcomer) == view(fresh) == view(broker) == view(worker)


# --- real processes -------------------------------------------------------------------


@pytest.fixture(scope="module")
def node_modules() -> None:
    ensure_node_modules()


def document_size(a: Any) -> int:
    return len(a.doc.get_update())


async def compactions_settled(cluster: Cluster) -> None:
    """Wait (bounded) until the market has compacted the room at least twice and no more
    for longer than a quiet period."""
    seen = -1
    for _ in range(15):
        count = cluster.compactions()
        if count == seen and count >= 2:
            return
        seen = count
        await asyncio.sleep(COMPACT_PAUSE + 1)
    raise AssertionError(f"the market kept compacting the room ({seen} compactions)")


@pytest.mark.timeout(240)
async def test_market_compacts_with_original_js_peers_connected_and_after_a_restart(
    cluster: Cluster, node_modules: None
) -> None:
    market = cluster.market("--compact-every", "1")
    room_name = "market"
    old = NodePeer(cluster.url, room_name, cluster.tmp / "old-node.log", name="old-node")
    try:
        await until(lambda: old.synced, 20, "the node peer to sync")
        async with agent(cluster.url, room_name, name="py-old") as py:
            for i in range(60):
                old.set("todos", f"t{i}", {"id": f"t{i}", "prompt": "x" * 40})
            await until(lambda: len(py.maps[MapName.TODOS]) == 60, 20, "python to see 60 todos")
            with py.transaction():
                for i in range(60):
                    py.maps[MapName.DONE][f"t{i}"] = {"id": f"t{i}", "response": "ñ" * 30}
                    del py.maps[MapName.TODOS][f"t{i}"]
                py.maps[MapName.STREAMS]["keep#1"] = Text("still streaming: 🙂")
            await until(lambda: len(old.maps.get("done", {})) == 60, 20, "node to see done")
            for i in range(60):
                old.send(op="delete", map="done", key=f"t{i}")
            old.set("todos", "keep", {"id": "keep", "prompt": "stay"})
            await until(
                lambda: not py.maps[MapName.DONE] and "keep" in py.maps[MapName.TODOS],
                20,
                "python to see the node's deletions",
            )
            full = document_size(py)
            # A compaction per task gone (every 1), then two once the flow paused: the first
            # marks the last dead keys, the second collects them.
            await compactions_settled(cluster)
            async with agent(cluster.url, room_name, name="py-new") as newcomer:
                assert document_size(newcomer) < full / 4, (document_size(newcomer), full)
                assert dict(newcomer.maps[MapName.TODOS]) == {
                    "keep": {"id": "keep", "prompt": "stay"}
                }
                assert str(newcomer.maps[MapName.STREAMS]["keep#1"]) == "still streaming: 🙂"
                # Old peers and the newcomer keep hearing each other.
                new_node = NodePeer(
                    cluster.url, room_name, cluster.tmp / "new-node.log", name="new-node"
                )
                try:
                    await until(lambda: new_node.synced, 20, "a new node peer to sync")
                    assert new_node.maps.get("todos") == {"keep": {"id": "keep", "prompt": "stay"}}
                    old.set("prepared", "p1", {"id": "p1", "from": "old-node"})
                    newcomer.maps[MapName.DOING]["d1"] = {"id": "d1", "from": "py-new"}
                    new_node.set("done", "n1", {"id": "n1", "from": "new-node"})
                    stream = py.maps[MapName.STREAMS]["keep#1"]
                    stream += " and on"

                    def everyone() -> bool:
                        want = {"prepared": {"p1"}, "doing": {"d1"}, "done": {"n1"}}
                        for maps in (old.maps, new_node.maps):
                            if any(set(maps.get(m, {})) != keys for m, keys in want.items()):
                                return False
                        for a in (py, newcomer):
                            if any(set(a.maps[MapName(m)]) != k for m, k in want.items()):
                                return False
                        return str(newcomer.maps[MapName.STREAMS]["keep#1"]).endswith("and on")

                    def seen() -> str:
                        maps = {"old-node": old.maps, "new-node": new_node.maps}
                        for a in (py, newcomer):
                            maps[a.name] = {
                                m.value: {k: str(v) for k, v in a.maps[m].items()} for m in MapName
                            }
                        return f"every peer to see every other's writes; they saw {maps}"

                    await until(everyone, 20, seen)
                finally:
                    new_node.kill()

        # The compacted room is what the store holds: a restart loads it, and the old
        # node peer (still holding the full history) re-syncs with it.
        market.kill()
        market = cluster.market("--compact-every", "1")
        async with agent(cluster.url, room_name, name="py-after") as after:
            await until(lambda: "p1" in after.maps[MapName.PREPARED], 20, "the stored room")
            assert document_size(after) < full / 4
            await until(lambda: old.status == "connected", 30, "the node peer to reconnect")
            old.set("todos", "after-restart", {"id": "after-restart"})
            await until(
                lambda: "after-restart" in after.maps[MapName.TODOS],
                20,
                "the node peer's write after the restart",
            )
            await asyncio.sleep(0)
            assert set(after.maps[MapName.TODOS]) == {"keep", "after-restart"}
    finally:
        old.kill()


@pytest.mark.timeout(180)
async def test_task_requeued_after_compactions_completes(cluster: Cluster) -> None:
    """The end-to-end form of the re-queue case: a task runs while the market compacts
    (other tasks finish meanwhile), then its worker is killed; the broker moves it back
    into ``todos`` and the other worker completes it."""
    cluster.market("--compact-every", "1")
    cluster.broker()
    workers = [cluster.worker("--delay", "0.05", name=n) for n in ("wa", "wb")]
    cluster.wait_agents("worker", 2)
    cluster.wait_agents("broker", 1)
    async with Client(cluster.url) as client:
        task = await client.submit("#repeat 400", timeout=120)

        def runner() -> str | None:
            doing = client.agent.maps[MapName.DOING].get(task.id)
            return doing.get(TaskField.WORKER) if isinstance(doing, dict) else None

        await until(runner, 20, "the long task to run")
        before = cluster.compactions()
        for i in range(3):  # quick tasks on the other worker, then two compactions
            assert await client.chat(f"quick {i}", timeout=30) == f"Echo: quick {i}"
        await until(lambda: cluster.compactions() >= before + 2, 30, "two compactions")
        assert task.id in client.agent.maps[MapName.DOING]  # still running
        name = worker_name(client.agent, str(runner()))
        assert name is not None
        by_name(workers, name).kill()
        answer = await task.result()
    assert answer.task[TaskField.STATE] == State.DONE.value and answer.task[TaskField.ATTEMPTS] == 2
    assert answer.text == "".join(f"tok{i} " for i in range(400))
