"""Replicas of one market sharing their rooms through Redis (``igora market --redis``).

Every test starts its own ``redis-server`` (no persistence, files in the test's tmp
folder) and three ``igora market`` processes on free ports of 127.0.0.1, with brokers,
echo workers and clients spread over them (docs/market.md "Replicas").
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pycrdt import Doc, Map

from igora.agent import Agent
from igora.client import Client
from igora.config import ConfigError, market_address
from igora.market.frames import awareness_message
from igora.market.replicas import Replicas, RoomLink
from igora.market.room import MarketRoom
from igora.market.store import Store
from igora.protocol import MapName
from igora.testing import Cluster, Proc, RedisServer, free_port, wait_for
from tests.market_peers import NodePeer, agent, ensure_node_modules, entry, until

from .conftest import wait_active_broker


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def three(cluster: Cluster, redis: RedisServer) -> Cluster:
    """Three replicas on one Redis; ``cluster.url`` lists them all."""
    cluster.replicas(redis.url, 3)
    return cluster


LONG = "".join(f"tok{i} " for i in range(40))  # the echo engine's answer to "#repeat 40"


def url_of(cluster: Cluster, i: int) -> str:
    return f"ws://127.0.0.1:{cluster.ports[i]}"


def agents_seen(cluster: Cluster, port: int, type: str) -> list[str]:
    return [
        a["name"]
        for room in cluster.status(port)["rooms"]
        for a in room["agents"]
        if a.get("type") == type
    ]


def replica_of(proc: Proc, cluster: Cluster) -> int:
    """The index of the replica a role (started at debug level) is connected to now."""
    found = re.findall(r"connected to ws://127\.0\.0\.1:(\d+)/", proc.log())
    assert found, proc.log()[-2000:]
    return cluster.ports.index(int(found[-1]))


# ------------------------------------------------------------------------------ tasks


async def test_three_replicas_complete_tasks_with_roles_spread_over_them(three: Cluster) -> None:
    three.broker("--market", url_of(three, 0))
    three.worker("--market", url_of(three, 1), name="w1")
    three.worker("--market", url_of(three, 2), name="w2")
    # Every replica sees every agent, wherever it is connected.
    for port in three.ports:
        await wait_for(
            lambda p=port: (
                {"w1", "w2"} <= set(agents_seen(three, p, "worker"))
                and agents_seen(three, p, "broker")
            ),
            30,
            f"replica on {port} to see both workers and the broker",
            three,
        )
    wait_active_broker(three)
    for i in range(3):  # a client on each replica
        async with Client(url_of(three, i), name=f"asker{i}") as client:
            answers = await asyncio.gather(*(client.chat(f"q{i}-{k}") for k in range(5)))
            assert answers == [f"Echo: q{i}-{k}" for k in range(5)]
    # One replica stores the room (holds its lease), the others do not.
    stored = [
        r["name"]
        for port in three.ports
        for r in three.status(port)["rooms"]
        if r.get("stored_here")
    ]
    assert stored == ["market"]


async def test_kill_9_of_a_replica_with_50_tasks_in_flight_loses_none(three: Cluster) -> None:
    three.log_level = "debug"  # the roles log which replica they are on
    broker = three.broker()
    three.worker("--slots", "10", "--delay", "0.05", name="w1")
    three.worker("--slots", "10", "--delay", "0.05", name="w2")
    three.worker("--slots", "10", "--delay", "0.05", name="w3")
    three.wait_agents("worker", 3)
    wait_active_broker(three)
    victim = replica_of(broker, three)  # the broker's replica: the broker moves too
    survivors = [p for i, p in enumerate(three.ports) if i != victim]
    # The client is on a replica that survives, so that the test counts its answers.
    async with Client(url_of(three, (victim + 1) % 3), name="asker", timeout=90) as client:
        tasks = [asyncio.create_task(client.chat(f"#repeat 40 n{k}")) for k in range(50)]
        await asyncio.sleep(1.0)
        assert not all(t.done() for t in tasks), "tasks must be in flight at the kill"
        replica = next(p for p in three.procs if p.log_path.name.endswith(f"replica{victim}.log"))
        replica.kill(signal.SIGKILL)
        answers = await asyncio.gather(*tasks)
    assert answers == [LONG] * 50
    await wait_for(
        lambda: replica_of(broker, three) != victim, 30, "the broker on another replica", three
    )
    # A surviving replica stores the room now (the lease of the dead one expired).
    await wait_for(
        lambda: [r for p in survivors for r in three.status(p)["rooms"] if r.get("stored_here")],
        30,
        "a surviving replica to store the room",
        three,
    )


async def test_agents_of_a_dead_replica_disappear_from_the_others(three: Cluster) -> None:
    # A worker that knows one replica only: when that replica dies it stays away.
    three.worker("--market", url_of(three, 2), name="lonely")
    async with agent(url_of(three, 0), "market", name="watcher") as watcher:

        def lonely_here() -> bool:  # stale or not: only a removal takes it away
            return any(p.state.get("name") == "lonely" for p in watcher.peers(include_stale=True))

        await until(lonely_here, 30, "replica 0 to relay the worker of replica 2")
        next(p for p in three.procs if p.log_path.name.endswith("replica2.log")).kill()
        await until(lambda: not lonely_here(), 40, "the worker of dead replica 2 to be removed")
    assert (
        "is gone (its liveness key expired)"
        in next(p for p in three.procs if p.log_path.name.endswith("replica0.log")).log()
    )


async def test_redis_restarted_mid_run_loses_no_task(three: Cluster, redis: RedisServer) -> None:
    three.broker("--market", url_of(three, 0))
    three.worker("--slots", "10", "--delay", "0.05", "--market", url_of(three, 1), name="w1")
    three.worker("--slots", "10", "--delay", "0.05", "--market", url_of(three, 2), name="w2")
    three.wait_agents("worker", 2)
    wait_active_broker(three)
    async with Client(url_of(three, 2), name="asker", timeout=90) as client:
        tasks = [asyncio.create_task(client.chat(f"#repeat 40 r{k}")) for k in range(30)]
        await asyncio.sleep(0.8)
        await asyncio.to_thread(redis.restart, 1.0)  # its data is gone
        answers = await asyncio.gather(*tasks)
        assert answers == [LONG] * 30
        # and the replicas work together again afterwards
        assert await client.chat("after the restart") == "Echo: after the restart"
    logs = [p.log() for p in three.procs if "replica" in p.log_path.name]
    assert all("Redis lost" in log and "Redis is back" in log for log in logs)


# ------------------------------------------------------------------------------ wire


async def test_javascript_client_on_one_replica_syncs_with_python_agent_on_another(
    three: Cluster, tmp_path: Path
) -> None:
    ensure_node_modules()
    node = NodePeer(url_of(three, 0), "wire", tmp_path / "node.log")
    try:
        await until(lambda: node.synced, 20, "the node client to sync")
        async with agent(url_of(three, 1), "wire", name="py") as py:
            node.set("todos", "from-node", {"id": "from-node", "prompt": "bonjour"})
            node.aware({"type": "client", "style": "text", "state": "ready"})
            await until(lambda: entry(py, "todos", "from-node"), 10, "python to see node's entry")
            await until(
                lambda: [p for p in py.peers() if p.state.get("name") == "node-peer"],
                10,
                "python to see node's awareness",
            )
            with py.transaction():
                py.maps[MapName.DONE]["from-py"] = {"id": "from-py", "response": "salut"}
            py.set_state(state="working")
            await until(
                lambda: node.maps.get("done", {}).get("from-py"), 10, "node to see python's entry"
            )
            await until(
                lambda: [s for s in node.others() if s.get("state") == "working"],
                10,
                "node to see python's awareness",
            )
        # A third replica, joining the room only now, serves the whole document.
        async with agent(url_of(three, 2), "wire", name="late") as late:
            assert entry(late, "todos", "from-node") == {"id": "from-node", "prompt": "bonjour"}
            assert entry(late, "done", "from-py") == {"id": "from-py", "response": "salut"}
    finally:
        node.kill()


# ------------------------------------------------------------------------------ errors


def run_igora(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "igora", *args], capture_output=True, text=True, timeout=60
    )


def test_market_exits_2_in_one_line_when_redis_does_not_answer(tmp_path: Path) -> None:
    run = run_igora(
        "market",
        "--port",
        str(free_port()),
        "--memory",
        "--redis",
        f"redis://127.0.0.1:{free_port()}",
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("igora market: error: Redis at redis://")
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize(
    "urls, why",
    [
        ("ws://a:1,", "has an empty item"),
        ("ws://a:1,http://b:2", "is not a websocket URL"),
        ("ws://a:1,ws://a:1", "names a URL twice"),
    ],
)
def test_a_malformed_list_of_market_urls_is_one_line_and_exit_2(urls: str, why: str) -> None:
    run = run_igora("status", "--market", urls)
    assert run.returncode == 2
    assert why in run.stderr and len(run.stderr.strip().splitlines()) == 1


def test_environment_lists_replicas_and_agents_start_on_any_of_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("YJS_ENV", "REMOTE")
    monkeypatch.setenv("YJS_REMOTE_URL", "wss://a.example/, ws://b.example:1234")
    monkeypatch.setenv("YJS_MARKET_ROOM", "salle")
    address = market_address()
    assert address.room_urls == ("wss://a.example/salle", "ws://b.example:1234/salle")
    starts = {Agent(address, type="client", name="x", style="text").url for _ in range(60)}
    assert starts == set(address.room_urls)  # 60 draws: both, but for 2 ** -59
    monkeypatch.setenv("YJS_REMOTE_URL", "wss://a.example,,ws://b.example")
    with pytest.raises(ConfigError, match=r"has an empty item.*\(from YJS_REMOTE_URL\)"):
        market_address()


async def test_a_run_of_updates_from_redis_is_applied_as_one(tmp_path: Path) -> None:
    """What a replica reads from Redis in one batch: consecutive updates are merged into one
    (one transaction, one frame to each connection); an awareness message ends the run;
    an invalid update is skipped with a warning, the others still applied."""
    store = Store(tmp_path / "s.db")
    room = MarketRoom("r", store)
    replicas = Replicas("redis://127.0.0.1:1/0")  # never connected here
    link = RoomLink(replicas, room)
    replicas.links["r"], room.link = link, link
    source = Doc()
    bench = source.get("bench", type=Map)
    updates: list[bytes] = []
    source.observe(lambda event: updates.append(event.update))
    for i in range(3):
        bench[f"k{i}"] = i
    channel = link.channel.encode()

    def update(n: int, data: bytes) -> dict[str, Any]:
        return {"type": "message", "channel": channel, "data": b"u %d %d-0 other " % (n, n) + data}

    received: list[bytes] = []
    receive = room.receive

    def spy(sender: Any, data: bytes, parsed: Any) -> str | None:
        received.append(data)
        return receive(sender, data, parsed)

    room.receive = spy  # type: ignore[method-assign]
    presence = awareness_message([(77, 1, {"name": "x"})])
    replicas._received_batch(
        [
            update(1, updates[0]),
            update(2, updates[1]),
            {"type": "message", "channel": channel, "data": b"a other " + presence},
            update(3, updates[2]),
            update(4, b"\x01\x02not an update"),
        ]
    )
    assert len(received) == 2  # 1 and 2 merged, then 3 alone
    assert link.last_n == 4
    assert 77 in room.awareness.states
    assert dict(room.ydoc.get("bench", type=Map)) == {"k0": 0.0, "k1": 1.0, "k2": 2.0}
    store.close()
