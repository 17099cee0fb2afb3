"""Issue 15's attacker suite, step 3 (docs/protocol-v3.md §12): a rogue agent (the raw
peer of tests/v3_peers.py, with an identity of its own) attacks a v3 room while an
honest broker, two echo workers and two askers serve tasks. Each test asserts the
market's answer to the attack and that every honest task ended done with the right
answer."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from pycrdt import Array, Doc, Map

from igora import Client
from igora.testing import Cluster, wait_for
from igora.v3 import wire
from igora.v3.tasks import (
    CHUNKS,
    PLAINTEXT,
    PROMPT,
    RUN,
    TASKS,
    asker_doc,
    inbox,
    prompt_doc,
    run_doc,
)
from tests.test_v3_roles import ROOM, connected, v3_room, words
from tests.v3_peers import RawPeer, new_identity, update_setting

SLOW = ("--delay", "0.02")  # echo: seconds per word, so that tasks are live during attacks

Attack = Callable[[Cluster, Client, Client, str], Awaitable[None]]


def under_attack(cluster: Cluster, monkeypatch: pytest.MonkeyPatch, attack: Attack) -> None:
    """Serve honest tasks from two askers; run ``attack(cluster, alice, bob, tid)`` with
    ``tid`` a task of alice's running meanwhile; every honest task must end done with the
    right answer."""
    v3_room(cluster, *SLOW)

    async def main() -> None:
        a, b = await connected(cluster, monkeypatch)
        try:
            target = words(60, "t")
            task = await a.submit(target)
            prompts = [(c, words(10, f"{c.name}{i}-")) for i in range(3) for c in (a, b)]
            honest = asyncio.gather(*(c.chat(p, max_tokens=40) for c, p in prompts))
            await attack(cluster, a, b, task.id)
            answer = await task.result()
            assert answer.text == f"Echo: {target}"
            assert await honest == [f"Echo: {p}" for _, p in prompts]
            assert await a.chat("after", max_tokens=10) == "Echo: after"
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


async def rogue(cluster: Cluster) -> RawPeer:
    return await RawPeer.join(cluster.url, ROOM, new_identity())


def test_overwrite_delete_or_abort_another_asker_task(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def attack(cluster: Cluster, a: Client, b: Client, tid: str) -> None:
        mine = Doc()
        attempts = [
            # overwrite the header with one asking for something else
            (asker_doc(a.id), update_setting(mine, TASKS, tid, {"id": tid, "model": "x"})),
            # replace the prompt
            (prompt_doc(a.id, tid), update_setting(Doc(), PROMPT, PLAINTEXT, {"prompt": "evil"})),
            # abort it as the asker would
            (prompt_doc(a.id, tid), update_setting(Doc(), PROMPT, "abort", True)),
        ]
        for name, update in attempts:
            peer = await rogue(cluster)
            await peer.send(wire.Doc(name, wire.Sync.UPDATE, update))
            assert await peer.closed() == (4403, f"write to a document you do not own: {name}")
        # delete it: drop the prompt document
        peer = await rogue(cluster)
        name = prompt_doc(a.id, tid)
        await peer.send(wire.Control({"op": "drop", "doc": name}))
        assert await peer.closed() == (4403, f"drop of a document you do not own: {name}")

    under_attack(cluster, monkeypatch, attack)


def test_write_a_run_for_a_task_not_given(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def attack(cluster: Cluster, a: Client, b: Client, tid: str) -> None:
        peer = await rogue(cluster)
        me = peer.response.ids[0] if peer.response else ""
        # Its own run document for alice's task: taken, and read by nobody.
        forged = Doc()
        forged.get(CHUNKS, type=Array).append("forged answer")
        forged.get(RUN, type=Map).update({"state": "done", "finishReason": "stop"})
        own = run_doc(me, tid, 1)
        await peer.send(wire.Doc(own, wire.Sync.UPDATE, forged.get_update()))
        await peer.barrier()
        # Another worker's run document: closed.
        worker = await wait_for(lambda: a.worker_of(tid), 10, "alice's task assigned", cluster)
        theirs = run_doc(worker, tid, 1)
        await peer.send(wire.Doc(theirs, wire.Sync.UPDATE, forged.get_update()))
        assert await peer.closed() == (4403, f"write to a document you do not own: {theirs}")

    under_attack(cluster, monkeypatch, attack)


def test_take_over_the_broker_role(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    async def attack(cluster: Cluster, a: Client, b: Client, tid: str) -> None:
        # The lease while the honest broker holds it: refused, in line.
        peer = await rogue(cluster)
        await peer.send(wire.Control({"op": "lease"}))
        notice = await peer.notice("")
        assert notice.code == wire.Code.LEASE_HELD and "lease held" in notice.text
        # An inbox entry without the lease (a status ending alice's task): closed.
        name = inbox(a.id)
        update = update_setting(Doc(), TASKS, tid, {"state": "failed", "error": "forged"})
        await peer.send(wire.Doc(name, wire.Sync.UPDATE, update))
        assert await peer.closed() == (4403, f"write to a document you do not own: {name}")

    under_attack(cluster, monkeypatch, attack)


def test_announce_another_agent_id(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """No frame carries a claimed id: a PRESENCE naming a worker's id changes nothing of
    that worker in who, and an advert in its name is closed."""

    async def attack(cluster: Cluster, a: Client, b: Client, tid: str) -> None:
        worker = await wait_for(lambda: a.worker_of(tid), 10, "alice's task assigned", cluster)

        def who() -> dict[str, dict[str, object]]:
            room = next(r for r in cluster.status()["rooms"] if r["name"] == ROOM)
            return {agent["id"]: agent for agent in room["agents"]}

        before = who()[worker]
        peer = await rogue(cluster)
        me = peer.response.ids[0] if peer.response else ""
        state = {"id": worker, "type": "worker", "name": "impostor"}
        await peer.send(wire.Presence({"state": state, "heartbeat": 5}))
        await peer.barrier()
        await wait_for(lambda: who().get(me, {}).get("name") == "impostor", 5, "the rogue in who")
        assert who()[worker] == before  # the worker's entry is its own
        await peer.send(wire.Control({"op": "advert", "id": worker, "name": "x"}))
        code, reason = await peer.closed()
        assert code == 4403 and worker[:20] in reason

    under_attack(cluster, monkeypatch, attack)
