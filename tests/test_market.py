"""The market (`igora market`) and the agent runtime, through real processes on 127.0.0.1:
the original stack's node client (npm yjs + y-websocket) and Python agents in one room."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import websockets
from pycrdt import Awareness, Doc, create_awareness_message, read_message

from igora import config
from igora.config import ConfigError, market_address
from igora.market.frames import awareness_entries
from igora.protocol import MapName

from .conftest import Cluster, Proc
from .market_peers import NodePeer, TcpProxy, agent, ensure_node_modules, entry, stored_maps, until


@pytest.fixture(scope="session")
def node_modules() -> None:
    ensure_node_modules()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One market for the tests that do not restart it; each test uses its own room."""
    c = Cluster(tmp_path_factory.mktemp("market"))
    c.market()
    yield c
    c.stop()


@pytest.fixture
def node(shared: Cluster, node_modules: None, request: pytest.FixtureRequest) -> Iterator[NodePeer]:
    """A node peer in the room named after the test."""
    peer = NodePeer(shared.url, room_of(request), shared.tmp / f"{room_of(request)}-node.log")
    yield peer
    peer.kill()


def room_of(request: pytest.FixtureRequest) -> str:
    return request.node.name.removeprefix("test_")[:60]


def http_get(url: str) -> tuple[str, str]:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.headers.get("content-type", ""), r.read().decode()


# ------------------------------------------------------------------------------ wire


async def test_node_client_and_python_agent_see_each_others_entries_and_awareness(
    shared: Cluster, node: NodePeer, request: pytest.FixtureRequest
) -> None:
    room_name = room_of(request)
    await until(lambda: node.synced, 20, "the node client to sync")
    async with agent(shared.url, room_name, name="py") as py:
        # node -> python: a map entry and an awareness state
        node.set("todos", "from-node", {"id": "from-node", "prompt": "bonjour", "n": 1})
        node.aware({"type": "client", "style": "text", "state": "ready"})
        await until(lambda: entry(py, "todos", "from-node"), 10, "python to see node's entry")
        assert entry(py, "todos", "from-node") == {"id": "from-node", "prompt": "bonjour", "n": 1}
        seen = await until(
            lambda: [p for p in py.peers() if p.state.get("name") == "node-peer"],
            10,
            "python to see node's awareness",
        )
        assert seen[0].state["style"] == "text"

        # python -> node
        with py.transaction():
            py.maps[MapName.DONE]["from-py"] = {"id": "from-py", "response": "salut"}
        py.set_state(state="working")
        await until(
            lambda: node.maps.get("done", {}).get("from-py"), 10, "node to see python's entry"
        )
        assert node.maps["done"]["from-py"] == {"id": "from-py", "response": "salut"}
        state = await until(
            lambda: [
                s for s in node.others() if s.get("name") == "py" and s.get("state") == "working"
            ],
            10,
            "node to see python's awareness",
        )
        assert state[0]["type"] == "client" and state[0]["id"] == py.id

        # what the market itself reports
        room = next(r for r in shared.status()["rooms"] if r["name"] == room_name)
        assert room["connections"] == 2
        assert {a.get("name") for a in room["agents"]} == {"py", "node-peer"}
        assert room["tasks"]["todos"] == 1 and room["tasks"]["done"] == 1


# ------------------------------------------------------------------------------ http


async def test_root_answers_okay_and_status_counts_connections_agents_and_tasks(
    shared: Cluster, request: pytest.FixtureRequest
) -> None:
    kind, body = http_get(f"http://127.0.0.1:{shared.port}/")
    assert body == "Okay" and kind.startswith("text/plain")
    room_name = room_of(request)
    async with agent(shared.url, room_name, name="counter") as a:
        with a.transaction():
            a.maps[MapName.TODOS]["t1"] = {"id": "t1", "state": "todo"}
            a.maps[MapName.TODOS]["t2"] = {"id": "t2", "state": "todo"}

        def seen() -> dict | None:
            status = shared.status()
            assert status["status"] == "ok" and status["connections"] >= 1
            room = next((r for r in status["rooms"] if r["name"] == room_name), None)
            return room if room and room["tasks"]["todos"] == 2 and room["agents"] else None

        room = await until(seen, 10, "/status to count the agent and its tasks")
    assert room["connections"] == 1
    assert room["agents"][0]["name"] == "counter" and room["agents"][0]["id"] == a.id
    assert room["tasks"] == {"todos": 2, "prepared": 0, "doing": 0, "done": 0}
    await until(
        lambda: (
            next(r for r in shared.status()["rooms"] if r["name"] == room_name)["connections"] == 0
        ),
        10,
        "/status to see the agent leave",
    )


async def test_many_agents_joining_a_new_room_at_once_are_all_served(
    shared: Cluster, request: pytest.FixtureRequest
) -> None:
    agents = [agent(shared.url, room_of(request), name=f"a{i}") for i in range(12)]
    await asyncio.gather(*(a.start() for a in agents))  # each waits for its sync
    try:
        with agents[0].transaction():
            agents[0].maps[MapName.TODOS]["hello"] = {"id": "hello"}
        await until(
            lambda: all(entry(a, "todos", "hello") for a in agents),
            10,
            "every agent to see the entry",
        )
        room = next(r for r in shared.status()["rooms"] if r["name"] == room_of(request))
        assert room["connections"] == 12
    finally:
        await asyncio.gather(*(a.stop() for a in agents))


# ------------------------------------------------------------------------------ liveness


async def test_killed_node_agent_is_removed_from_awareness_at_once(
    shared: Cluster, node: NodePeer, request: pytest.FixtureRequest
) -> None:
    node.aware({"type": "worker", "style": "text", "state": "ready"})
    async with agent(shared.url, room_of(request), name="watcher", heartbeat=5) as py:
        await until(
            lambda: any(p.state.get("name") == "node-peer" for p in py.peers(include_stale=True)),
            10,
            "the node peer",
        )
        node.kill()
        # The node peer advertised no heartbeat: staleness alone would take 30 s. The market
        # removes its state when the socket closes, so it goes within a couple of seconds.
        await until(
            lambda: (
                not any(p.state.get("name") == "node-peer" for p in py.peers(include_stale=True))
            ),
            3,
            "the killed peer's awareness state to be removed",
        )
    await until(lambda: "node-peer" not in json.dumps(shared.status()), 3, "market status")
    assert f"room {room_of(request)}: 127.0.0.1:" in shared.procs[0].log()


async def test_a_killed_node_agent_takes_only_its_own_awareness_state_with_it(
    shared: Cluster, node_modules: None, request: pytest.FixtureRequest
) -> None:
    # y-websocket clients re-broadcast every awareness change they apply, so the node peer
    # also sends the Python agent's state: the market must not remove it when node goes.
    room_name = room_of(request)
    node = NodePeer(shared.url, room_name, shared.tmp / f"{room_name}-node.log")
    try:
        async with (
            agent(shared.url, room_name, name="a", heartbeat=30) as a,
            agent(shared.url, room_name, name="watcher", heartbeat=30) as w,
        ):
            node.aware({"type": "worker", "state": "ready"})
            a.set_state(state="working")
            await until(
                lambda: any(
                    s.get("name") == "a" and s.get("state") == "working" for s in node.others()
                ),
                10,
                "node to apply a's state",
            )
            node.set("todos", "barrier", {"id": "barrier"})  # same socket, sent after
            await until(lambda: entry(w, "todos", "barrier"), 10, "node's later message")
            a_id = a.awareness.client_id
            gaps: list[bool] = []
            w.on_change(lambda: gaps.append(a_id not in w.awareness.states))
            node.kill()
            await until(
                lambda: (
                    not any(p.state.get("name") == "node-peer" for p in w.peers(include_stale=True))
                ),
                5,
                "node's state to be removed",
            )
            assert not any(gaps), "the market removed a's state when node left"
            assert any(p.state.get("name") == "a" for p in w.peers())
    finally:
        node.kill()


async def test_a_watching_node_client_that_rebroadcasts_a_state_does_not_remove_it(
    shared: Cluster, node_modules: None, request: pytest.FixtureRequest
) -> None:
    # A y-websocket client without a state of its own re-broadcasts the one state it
    # receives on joining: the market must not take it for that client's own.
    room_name = room_of(request)
    async with (
        agent(shared.url, room_name, name="a", heartbeat=30) as a,
        websockets.connect(f"{shared.url}/{room_name}") as listener,
    ):
        removals: list[int] = []

        async def listen() -> None:  # a raw socket with no state: sees every relay
            async for message in listener:
                if isinstance(message, bytes) and message[:1] == b"\x01":
                    removals.extend(
                        c
                        for c, _, state in awareness_entries(read_message(message[1:]))
                        if state is None
                    )

        listening = asyncio.create_task(listen())
        node = NodePeer(shared.url, room_name, shared.tmp / f"{room_name}-node.log", silent=True)
        try:
            await until(
                lambda: any(s.get("name") == "a" for s in node.others()),
                10,
                "the node client to receive a's state",
            )
            node.set("todos", "barrier", {"id": "barrier"})  # sent after its re-broadcast
            await until(lambda: entry(a, "todos", "barrier"), 10, "node's later message")
            await asyncio.sleep(0.2)  # let the listener read what came before the barrier
            assert a.awareness.client_id not in removals, "a's state was removed"
            assert any(s.get("name") == "a" for s in node.others())
        finally:
            node.kill()
            listening.cancel()


async def test_silent_peer_is_stale_after_three_heartbeats(
    shared: Cluster, request: pytest.FixtureRequest
) -> None:
    async with agent(shared.url, room_of(request), name="watcher") as py:
        # A raw y-websocket connection that announces itself once (heartbeat 0.4 s), then
        # stays connected and silent: alive for the socket, dead for the protocol.
        doc = Doc()
        aw = Awareness(doc)
        aw.set_local_state(
            {
                "id": "silent",
                "name": "silent",
                "type": "worker",
                "style": "text",
                "state": "ready",
                "heartbeat": 0.4,
            }
        )
        async with websockets.connect(f"{shared.url}/{room_of(request)}") as ws:
            await ws.send(create_awareness_message(aw.encode_awareness_update([aw.client_id])))
            await until(
                lambda: any(p.state.get("id") == "silent" for p in py.peers()),
                10,
                "the silent peer to appear",
            )
            await until(
                lambda: not any(p.state.get("id") == "silent" for p in py.peers()),
                5,
                "the silent peer to become stale",
            )
            stale = [p for p in py.peers(include_stale=True) if p.state.get("id") == "silent"]
            assert stale, "a stale peer is still listed on request"
            client_id, state = stale[0].client_id, stale[0].state
            heard = py.awareness.meta[client_id]["lastUpdated"]
            assert not py.is_stale(client_id, state, now=heard + 3 * 400 - 1)
            assert py.is_stale(client_id, state, now=heard + 3 * 400 + 1)
            # an original agent advertises no heartbeat: the y-protocols 30 s timeout applies
            original = {k: v for k, v in state.items() if k != "heartbeat"}
            assert not py.is_stale(client_id, original, now=heard + 29_999)
            assert py.is_stale(client_id, original, now=heard + 30_001)


# ------------------------------------------------------------------------------ restart


async def test_market_killed_and_restarted_keeps_document_and_agents_resume(
    cluster: Cluster, node_modules: None
) -> None:
    market = cluster.market()
    node = NodePeer(cluster.url, "wire", cluster.tmp / "node-peer.log")
    node2 = NodePeer(cluster.url, "wire", cluster.tmp / "node-peer-2.log", name="node-2")
    try:
        await restart_scenario(cluster, market, node, node2)
    finally:
        node.kill()
        node2.kill()


async def restart_scenario(cluster: Cluster, market: Proc, node: NodePeer, node2: NodePeer) -> None:
    db = cluster.data / "market.sqlite3"
    entries = {f"t{i}": {"id": f"t{i}", "prompt": "é" * i, "n": i} for i in range(20)}

    # 1. The store alone: the writer leaves, the market is killed, nobody resyncs it.
    async with agent(cluster.url, "kept", name="writer") as w:
        with w.transaction():
            for k, v in entries.items():
                w.maps[MapName.TODOS][k] = v
    await until(
        lambda: stored_maps(db, "kept").get("todos") == entries, 5, "the entries to be in the store"
    )
    market.kill()
    market = cluster.market()
    async with agent(cluster.url, "kept", name="reader") as r:
        assert dict(r.maps[MapName.TODOS].to_py() or {}) == entries

    # 2. Connected agents (python and node) resume by themselves after a SIGKILL.
    await until(lambda: node.synced, 20, "the node client to sync")
    node.aware({"type": "worker", "state": "ready"})
    node2.aware({"type": "worker", "state": "ready"})
    async with agent(cluster.url, "wire", name="resumer") as py:
        with py.transaction():
            py.maps[MapName.TODOS]["before"] = {"id": "before"}
        await until(lambda: "before" in node.maps.get("todos", {}), 10, "node sees 'before'")
        market.kill()
        await until(
            lambda: not py.connected and node.status == "disconnected",
            10,
            "both clients to notice the market is gone",
        )
        market = cluster.market()
        await until(
            lambda: py.connected and node.status == "connected",
            15,
            "both clients to reconnect by themselves",
        )
        with py.transaction():
            py.maps[MapName.TODOS]["after"] = {"id": "after"}
        node.set("todos", "node-after", {"id": "node-after"})
        await until(lambda: "after" in node.maps.get("todos", {}), 10, "node sees 'after'")
        await until(lambda: entry(py, "todos", "node-after"), 10, "python sees 'node-after'")
        async with agent(cluster.url, "wire", name="newcomer") as fresh:
            await until(
                lambda: {"before", "after", "node-after"} <= set(fresh.maps[MapName.TODOS].keys()),
                10,
                "a newcomer to see everything",
            )
            await until(
                lambda: {"resumer", "node-peer"} <= {p.state.get("name") for p in fresh.peers()},
                10,
                lambda: (
                    "a newcomer to see both resumed agents' awareness; it sees "
                    + str(
                        [
                            (p.state.get("name"), fresh.is_stale(p.client_id, p.state))
                            for p in fresh.peers(include_stale=True)
                        ]
                    )
                ),
            )
    # Two original (y-websocket) agents see each other again at once, not at their next
    # renewal 15 s later: they re-announce at an unchanged clock (see MarketChannel.nudge).
    await until(
        lambda: any(s.get("name") == "node-2" for s in node.others()), 5, "node to see node-2 again"
    )


async def test_sigterm_flushes_the_store_before_the_market_exits(cluster: Cluster) -> None:
    market = cluster.market()
    async with agent(cluster.url, "term", name="writer") as w:
        for i in range(300):  # a burst: grouped writes still pending when SIGTERM comes
            with w.transaction():
                w.maps[MapName.TODOS][f"k{i}"] = {"i": i}
        await until(
            lambda: cluster.status()["rooms"][0]["tasks"]["todos"] == 300,
            10,
            "the market to have the burst",
        )
        market.kill(signal.SIGTERM)
    assert "store" in market.log() and "flushed and closed" in market.log()
    assert len(stored_maps(cluster.data / "market.sqlite3", "term")["todos"]) == 300


async def test_idle_room_leaves_memory_and_comes_back_from_the_store_with_its_archive(
    cluster: Cluster,
) -> None:
    cluster.market("--room-idle", "0.3")
    done = {"id": "d1", "state": "done", "response": "fini", "end": 1}
    async with agent(cluster.url, "idle", name="writer") as w:
        with w.transaction():
            w.maps[MapName.TODOS]["t1"] = {"id": "t1", "state": "todo"}
            w.maps[MapName.DONE]["d1"] = done
    await until(lambda: "unloaded from memory" in cluster.procs[0].log(), 10, "the unload")
    assert "idle" not in [r["name"] for r in cluster.status()["rooms"]]
    _, body = http_get(f"http://127.0.0.1:{cluster.port}/rooms/idle/tasks/d1")
    assert json.loads(body) == done
    with pytest.raises(urllib.error.HTTPError) as missing:
        http_get(f"http://127.0.0.1:{cluster.port}/rooms/idle/tasks/t1")  # not finished
    assert missing.value.code == 404
    error = json.loads(missing.value.read())["error"]
    assert error["code"] == "no_task" and "'t1'" in error["message"]
    async with agent(cluster.url, "idle", name="reader") as r:
        assert entry(r, "todos", "t1") == {"id": "t1", "state": "todo"}
        assert entry(r, "done", "d1") == done


async def test_agents_reconnect_by_themselves_when_the_network_drops(
    shared: Cluster, node_modules: None, request: pytest.FixtureRequest
) -> None:
    proxy = TcpProxy(shared.port)
    await proxy.start()
    room_name = room_of(request)
    url = f"ws://127.0.0.1:{proxy.port}"
    node = NodePeer(url, room_name, shared.tmp / f"{room_name}-node.log")
    try:
        async with (
            agent(url, room_name, name="behind-proxy") as py,
            agent(shared.url, room_name, name="direct") as direct,
        ):
            node.aware({"type": "worker", "state": "ready"})
            await until(
                lambda: node.status == "connected" and len(direct.peers()) == 2,
                20,
                "the node peer and the proxied agent to be seen",
            )
            assert proxy.cut() == 2
            await until(
                lambda: not py.connected and node.status == "disconnected",
                10,
                "both proxied clients to notice the drop",
            )
            await until(
                lambda: py.connected and node.status == "connected",
                15,
                "both proxied clients to reconnect by themselves",
            )
            with direct.transaction():
                direct.maps[MapName.TODOS]["after-drop"] = {"id": "after-drop"}
            await until(
                lambda: (
                    entry(py, "todos", "after-drop") and "after-drop" in node.maps.get("todos", {})
                ),
                10,
                "the reconnected clients to receive a new entry",
            )
            await until(
                lambda: (
                    {"behind-proxy", "node-peer"} <= {p.state.get("name") for p in direct.peers()}
                ),
                10,
                "their awareness states to be back",
            )
    finally:
        node.kill()
        await proxy.stop()


# ------------------------------------------------------------------------------ config


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in ("YJS_ENV", "YJS_LOCAL_URL", "YJS_REMOTE_URL", "YJS_MARKET_ROOM"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(config, "_dotenv_loaded", False)
    return tmp_path


def test_original_environment_names_choose_the_market(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert market_address() == config.MarketAddress("ws://localhost:1234", "market")
    monkeypatch.setenv("YJS_LOCAL_URL", "ws://127.0.0.1:4321/")
    monkeypatch.setenv("YJS_MARKET_ROOM", "salle")
    assert market_address().room_url == "ws://127.0.0.1:4321/salle"
    monkeypatch.setenv("YJS_ENV", "remote")
    monkeypatch.setenv("YJS_REMOTE_URL", "wss://market.example")
    assert market_address().room_url == "wss://market.example/salle"
    # flags win over the environment
    assert market_address("ws://h:1", "r").room_url == "ws://h:1/r"


def test_dotenv_file_is_read_and_real_environment_wins(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (clean_env / ".env").write_text(
        "YJS_ENV=REMOTE\nYJS_REMOTE_URL=wss://from-dotenv.example\nYJS_MARKET_ROOM=dot\n"
    )
    monkeypatch.setenv("YJS_MARKET_ROOM", "real")
    assert market_address().room_url == "wss://from-dotenv.example/real"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"YJS_ENV": "MOON"}, "YJS_ENV must be LOCAL or REMOTE"),
        ({"YJS_ENV": "REMOTE"}, "needs YJS_REMOTE_URL"),
        ({"YJS_LOCAL_URL": "http://localhost:1234"}, "not a websocket URL"),
        ({"YJS_LOCAL_URL": "ws://localhost:99999"}, "bad port"),
        ({"YJS_MARKET_ROOM": "a/b"}, "room name"),
    ],
)
def test_bad_settings_raise_config_error(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=message):
        market_address()


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    import os

    clean = {k: v for k, v in os.environ.items() if not k.startswith("YJS_")}
    return subprocess.run(
        [sys.executable, "-m", "igora", *args],
        cwd=cwd,
        text=True,
        capture_output=True,
        env={**clean, **(env or {})},
        timeout=timeout,
    )


BAD_CLI = [
    (["status"], {"YJS_ENV": "MOON"}, "YJS_ENV must be LOCAL or REMOTE"),
    (["broker", "--market", "http://127.0.0.1:1"], {}, "not a websocket URL"),
    (["market", "--port", "70000"], {}, "--port 70000 is not a TCP port"),
    (["market", "--compact-every", "-5"], {}, "--compact-every must be at least 0"),
]


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"max_message": 0}, "--max-message must be at least 1024"),
        ({"max_connections": 0}, "--max-connections must be at least 1"),
        ({"max_per_address": -1}, "--max-per-address must be at least 1"),
        ({"room_idle": 0}, "--room-idle must be a positive number"),
        ({"compact_every": -1}, "--compact-every must be at least 0"),
    ],
)
def test_market_limits_are_checked_before_anything_starts(
    tmp_path: Path, limits: dict[str, float], message: str
) -> None:
    from igora.market.limits import MarketSettings
    from igora.market.run import run_market

    with pytest.raises(ConfigError, match=message):
        run_market("127.0.0.1", 1234, tmp_path / "data", MarketSettings(**limits))  # type: ignore[arg-type]
    assert not (tmp_path / "data").exists()


def test_cli_bad_values_give_one_line_error_and_exit_code_2(tmp_path: Path) -> None:
    import os

    clean = {k: v for k, v in os.environ.items() if not k.startswith("YJS_")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "igora", *args, "--log-level", "error"],
            cwd=tmp_path,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**clean, **env},
        )
        for args, env, _ in BAD_CLI
    ]  # at once: each start costs an interpreter
    for p, (args, _, message) in zip(procs, BAD_CLI, strict=True):
        _, err = p.communicate(timeout=60)
        assert p.returncode == 2, (args, err)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and message in lines[0], (args, err)


def test_cli_reads_dotenv_to_find_the_market_and_a_busy_port_is_a_clear_error(
    shared: Cluster, tmp_path: Path
) -> None:
    (tmp_path / ".env").write_text(
        f"YJS_ENV=LOCAL\nYJS_LOCAL_URL={shared.url}\nYJS_MARKET_ROOM=from-dotenv\n"
    )
    status = run_cli("status", "--json", cwd=tmp_path)
    busy = run_cli("market", "--port", str(shared.port), "--memory", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert "from-dotenv" in [r["name"] for r in shared.status()["rooms"]]
    assert busy.returncode == 2, busy.stderr
    assert busy.stderr.strip().splitlines() == [
        f"igora market: error: port {shared.port} on 127.0.0.1 is in use (another market is "
        "running? choose another with --port)"
    ]
