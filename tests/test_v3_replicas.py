"""A secure market on three replicas sharing its v3 rooms through Redis (``igora market
--secure --redis``; docs/market.md "v3 rooms across replicas").

Every test starts its own ``redis-server`` and three ``igora market --secure`` processes
on free ports of 127.0.0.1 sharing one ``--data`` folder (one market key, one store), and
puts the broker, the workers and the askers on different replicas: each role is given
the list of replicas starting with its own, so it moves to the next when its own dies.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pycrdt import Doc, Map

from igora.client import Client
from igora.credits import pricing
from igora.identity import load_identity
from igora.market.replicas import Replicas
from igora.market.store import Store
from igora.market.v3.replicas import (
    EventError,
    V3Link,
    apply_event,
    attach_event,
    drop_event,
    state_event,
    update_event,
)
from igora.market.v3.room import DocLimits, V3Room
from igora.testing import Cluster, Proc, RedisServer, wait_for, wait_until
from igora.v3 import wire
from igora.v3.tasks import TASKS, inbox, prompt_doc
from tests.test_attacks import (
    SLOW,
    overwrite_delete_or_abort,
    read_another_prompt_or_answer,
    take_over_the_broker_role,
    under_attack,
)
from tests.test_v3_membership import action, joins, refused
from tests.test_v3_roles import ROOM, words
from tests.v3_peers import RawPeer, new_identity, update_setting


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


def urls(cluster: Cluster, first: int) -> str:
    """The replicas' URLs, replica ``first`` first (a v3 agent starts on the first)."""
    ports = cluster.ports[first:] + cluster.ports[:first]
    return ",".join(f"ws://127.0.0.1:{port}" for port in ports)


def v3_replicas(
    cluster: Cluster, redis: RedisServer, *worker_args: str, secure: bool = True, brokers: int = 1
) -> tuple[list[Proc], list[Proc]]:
    """Three replicas, secure (only the brokers' keys may broker) or with the open v3 room
    ROOM (any identity may ask for the lease, as in tests/test_attacks.py); broker b1 on
    replica 0 (b2 on replica 1...), the echo workers w1 and w2 on replicas 1 and 2 (each
    with its own identity); the replicas' and the brokers' processes."""
    names = [f"b{i + 1}" for i in range(brokers)]
    ids = [load_identity(Path(cluster.agent_data(n)["IGORA_DATA"]))[0].id for n in names]
    # --broker-key=ID: an id may start with "-"
    flags = ["--secure", "--members", "open", *(f"--broker-key={i}" for i in ids)]
    procs = cluster.replicas(redis.url, 3, *(flags if secure else ["--v3-room", ROOM]))
    roles = [
        cluster.broker("--market", urls(cluster, i), "--room", ROOM, name=name, data=True)
        for i, name in enumerate(names)
    ]
    for i, name in ((1, "w1"), (2, "w2")):
        cluster.worker(
            "--market", urls(cluster, i), "--room", ROOM, *worker_args, name=name, data=True
        )
    cluster.wait_agents("worker", 2)
    cluster.wait_agents("broker", brokers)
    return procs, roles


def asker(cluster: Cluster, name: str, replica: int, monkeypatch: pytest.MonkeyPatch) -> Client:
    monkeypatch.setenv("IGORA_DATA", cluster.agent_data(name)["IGORA_DATA"])
    return Client(urls(cluster, replica), ROOM, name=name, timeout=90)


def agents_on(cluster: Cluster, port: int) -> dict[str, dict[str, object]]:
    """``who`` of ROOM as the replica on ``port`` shows it (its ``/status``)."""
    rooms = [r for r in cluster.status(port)["rooms"] if r["name"] == ROOM]
    return {a["id"]: a for r in rooms for a in r["agents"]}


# ------------------------------------------------------------------------------ tasks


def test_three_secure_replicas_complete_encrypted_tasks(
    cluster: Cluster, redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Askers on each replica get their answers (end-to-end encrypted, protocol 3) from
    workers on other replicas through a broker on a third; every replica's ``who``
    lists every agent, each with the replica it is connected to; a drop reaches the
    readers on another replica; a rogue on each
    replica is refused another's inbox and the broker role; one replica stores the
    room."""
    v3_replicas(cluster, redis)

    async def main() -> None:
        clients = []
        for i in range(3):  # each connects with its own identity (read at connect)
            clients.append(asker(cluster, f"asker{i}", i, monkeypatch))
            await clients[-1].connect()
        try:
            assert all(c.v3 is not None for c in clients)
            prompts = [(c, words(8, f"{c.name}-{k}-")) for c in clients for k in range(4)]
            answers = await asyncio.gather(*(c.chat(p, max_tokens=20) for c, p in prompts))
            assert answers == [f"Echo: {p}" for _, p in prompts]
            ids = {c.id for c in clients}

            def everyone_everywhere() -> bool:
                views = [agents_on(cluster, port) for port in cluster.ports]
                return all(ids <= set(v) and len(v) >= 6 for v in views)

            await wait_for(everyone_everywhere, 20, "every agent in who on every replica")
            view = agents_on(cluster, cluster.ports[0])
            assert {view[c.id]["replica"] for c in clients} == {
                cluster.status(port)["replica"] for port in cluster.ports
            }
            # A drop crosses replicas: asker0 (replica 0) drops each prompt once answered,
            # and the worker that ran it (replica 1 or 2) gets the NOTICE 410.
            workers = [p for p in cluster.procs if p.log_path.name.endswith(("w1.log", "w2.log"))]

            def dropped() -> bool:
                return any(
                    f"p/{clients[0].id}/" in line and "dropped by its owner" in line
                    for w in workers
                    for line in w.log().splitlines()
                )

            await wait_for(dropped, 10, "a worker told of asker0's dropped prompt", cluster)
            # On every replica, a rogue member may neither read another's inbox nor ask
            # for the lease (not a broker key), nor write an inbox: the secure rules.
            for i in range(3):
                url = f"ws://127.0.0.1:{cluster.ports[i]}"
                rogue = new_identity()
                peer = await RawPeer.join(url, ROOM, rogue)
                name = inbox(clients[(i + 1) % 3].id)
                await peer.send(wire.Subscribe(((name, False),)))
                assert (await peer.notice(name)).code == wire.Code.REFUSED
                await peer.send(wire.Control({"op": "lease"}))
                assert (await peer.notice("")).code == wire.Code.REFUSED
                # One ledger for every replica (credits.md §7): its grant, on any replica.
                await peer.send(wire.Control({"op": "balance", "id": rogue.id}))
                notice = await peer.notice("")
                assert notice.code == wire.Code.CREDITS, notice
                assert json.loads(notice.text)["balance"] == pricing.DEFAULT_GRANT
                update = update_setting(Doc(), TASKS, "t" * 16, {"state": "failed"})
                await peer.send(wire.Doc(name, wire.Sync.UPDATE, update))
                assert await peer.closed() == (4403, f"write to a document you do not own: {name}")
        finally:
            for c in clients:
                await c.close()

    asyncio.run(main())
    stored = [
        r["name"]
        for port in cluster.ports
        for r in cluster.status(port)["rooms"]
        if r.get("stored_here")
    ]
    assert stored == [ROOM]


def test_kill_9_of_the_broker_replica_with_tasks_in_flight_loses_none(
    cluster: Cluster, redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kill -9 of replica 0, which holds the broker (and the broker lease), while 30
    tasks run: the lease moves to another replica with a newer epoch once the dead
    one's expires, the broker moves there, and every task ends done."""
    procs, _ = v3_replicas(cluster, redis, "--slots", "10", "--delay", "0.05")

    async def main() -> None:
        async with asker(cluster, "alice", 2, monkeypatch) as client:
            assert await client.chat("warm up", max_tokens=5) == "Echo: warm up"
            assert "broker lease to" in procs[0].log()  # the broker holds it on replica 0
            epoch = agents_epoch(cluster, cluster.ports[2])
            texts = [words(40, f"k{k}-") for k in range(30)]
            tasks = [asyncio.create_task(client.chat(t, max_tokens=60)) for t in texts]
            await asyncio.sleep(1.0)
            assert not all(t.done() for t in tasks), "tasks must be in flight at the kill"
            procs[0].kill(signal.SIGKILL)
            answers = await asyncio.gather(*tasks)
            assert answers == [f"Echo: {t}" for t in texts]
            assert agents_epoch(cluster, cluster.ports[2]) > epoch
            assert await client.chat("after", max_tokens=5) == "Echo: after"
        moved = [p for p in procs[1:] if "broker lease to" in p.log()]
        assert moved, "the broker lease on a surviving replica"

    asyncio.run(main())


def test_redis_restarted_mid_run_loses_no_task(
    cluster: Cluster, redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis restarted empty while 20 tasks run: the replicas publish their rooms again,
    the broker's replica finds its lease gone and closes it, the broker asks again and
    gets the next epoch; every task ends done."""
    procs, _ = v3_replicas(cluster, redis, "--slots", "10", "--delay", "0.05")

    async def main() -> None:
        async with asker(cluster, "alice", 2, monkeypatch) as client:
            assert await client.chat("warm up", max_tokens=5) == "Echo: warm up"
            texts = [words(40, f"r{k}-") for k in range(20)]
            tasks = [asyncio.create_task(client.chat(t, max_tokens=60)) for t in texts]
            await asyncio.sleep(0.8)
            await asyncio.to_thread(redis.restart, 1.0)  # its data is gone
            answers = await asyncio.gather(*tasks)
            assert answers == [f"Echo: {t}" for t in texts]
            await wait_for(lambda: "broker lease lost" in procs[0].log(), 20, "the loss", cluster)
            await wait_for(
                lambda: agents_epoch(cluster, cluster.ports[0]) > epoch,
                30,
                "the broker's lease again, with a newer epoch",
                cluster,
            )
            assert await client.chat("after", max_tokens=5) == "Echo: after"

    epoch = agents_epoch(cluster, cluster.ports[0])
    asyncio.run(main())
    logs = [p.log() for p in procs]
    assert all("Redis lost" in log and "Redis is back" in log for log in logs)


def agents_epoch(cluster: Cluster, port: int) -> int:
    """The broker lease's epoch of ROOM on the replica on ``port``."""
    return int(lease_on(cluster, port)["epoch"])


def lease_on(cluster: Cluster, port: int) -> dict[str, Any]:
    """The broker lease of ROOM as the replica on ``port`` shows it."""
    room = next(r for r in cluster.status(port)["rooms"] if r["name"] == ROOM)
    lease: dict[str, Any] = room["lease"]
    return lease


def test_the_lease_moves_to_another_replica_when_its_holder_disconnects(
    cluster: Cluster, redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two brokers on two replicas: the holder's process killed, its replica frees the
    lease at once (it has no other broker in line) and says so; the other replica takes
    it for its broker with the next epoch; tasks complete."""
    procs, brokers = v3_replicas(cluster, redis, brokers=2)

    def holders() -> list[int]:
        return [i for i, port in enumerate(cluster.ports) if lease_on(cluster, port)["held"]]

    [first] = wait_until(
        lambda: h if len(h := holders()) == 1 else None, 20, "one replica with the lease", cluster
    )
    assert first in (0, 1)
    epoch = agents_epoch(cluster, cluster.ports[first])
    brokers[first].kill(signal.SIGKILL)
    other = 1 - first
    wait_until(lambda: holders() == [other], 20, "the lease on the other broker's replica", cluster)
    wait_until(
        lambda: agents_epoch(cluster, cluster.ports[2]) == epoch + 1,
        10,
        "the next epoch in dir on the third replica",
        cluster,
    )
    assert "broker lease released" in procs[first].log()  # not left to expire

    async def main() -> None:
        async with asker(cluster, "alice", 2, monkeypatch) as client:
            assert await client.chat("moved", max_tokens=5) == "Echo: moved"

    asyncio.run(main())


# ------------------------------------------------------------------------------ members


async def test_members_and_bans_hold_on_every_replica(cluster: Cluster, redis: RedisServer) -> None:
    """Replicas sharing one --data folder read one members table: a non-member is
    refused by each, a member admitted by each, and a ban closes the member's
    connections on all three."""
    cluster.replicas(redis.url, 3, "--secure")  # --members list
    alice = new_identity()
    replica_urls = [f"ws://127.0.0.1:{port}" for port in cluster.ports]
    for url in replica_urls:
        denied, code, _ = await refused(url, alice)
        assert code == 4403 and "not a member" in denied
    action(cluster, "members", "add", alice.id)
    peers = [await joins(url, alice) for url in replica_urls]
    action(cluster, "ban", alice.id, "--reason", "spam")
    for peer in peers:
        assert await peer.closed(timeout=10) == (4403, "banned: spam")


# ------------------------------------------------------------------------------ attacks


@pytest.mark.parametrize(
    "attack",
    [overwrite_delete_or_abort, take_over_the_broker_role, read_another_prompt_or_answer],
    ids=["write-another-document", "take-the-broker-role", "read-another-prompt-or-answer"],
)
def test_attacks_hold_on_every_replica(
    cluster: Cluster, redis: RedisServer, monkeypatch: pytest.MonkeyPatch, attack: object
) -> None:
    """tests/test_attacks.py's attacks against three replicas serving the room as it
    does (an open v3 room: the rogue may ask for the lease, which another replica's
    broker holds): the rogue connects to each replica in turn, the roles are spread over
    them."""
    v3_replicas(cluster, redis, *SLOW, secure=False)
    under_attack(cluster, monkeypatch, attack, started=True)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ events


async def test_events_from_redis_apply_in_order_and_bad_ones_are_skipped(tmp_path: Path) -> None:
    """What a replica reads from Redis for a v3 room: an update creates the document (and
    counts it for its owner), an attach and a drop take effect, a room's state merges
    into the logs without counting twice; an entry that is no event is logged and
    skipped, the next still applied; this replica's own entries are not applied again."""
    store = Store(tmp_path / "s.db")
    replicas = Replicas("redis://127.0.0.1:1/0")  # never connected here
    room = V3Room(ROOM, store, DocLimits(task_document=1 << 20), replica=replicas.id)
    link = V3Link(replicas, room)
    owner, worker = new_identity().id, new_identity().id
    prompt = prompt_doc(owner, "t" * 16)
    source: Doc = Doc()
    first = update_setting(source, "prompt", "ct", "x")
    second = update_setting(source, "prompt", "abort", False)
    link.apply(
        [
            (1, "other", update_event(prompt, first)),
            (2, "other", b"\x00garbage"),
            (3, "other", attach_event(worker, [prompt])),
            (4, replicas.id, update_event(prompt, b"\x00\x00")),  # ours: applied already
            (5, "other", update_event(prompt, second)),
        ]
    )
    assert room.task_documents[owner] == 1
    assert room.attachments == {worker: {prompt}}
    merged: Doc = Doc()
    merged.apply_update(room.docs[prompt].state())
    assert dict(merged.get("prompt", type=Map)) == {"ct": "x", "abort": False}
    size = room.docs[prompt].size
    link.apply([(6, "other", state_event({prompt: source.get_update()}, {}))])
    assert room.docs[prompt].size == size  # merged at once, not counted twice
    link.apply([(7, "other", drop_event(prompt))])
    assert prompt not in room.docs and not room.attachments and not room.task_documents
    with pytest.raises(EventError):
        apply_event(room, update_event(prompt, first)[:-3] + b"\xff\xff\xff\xff")
    store.close()
