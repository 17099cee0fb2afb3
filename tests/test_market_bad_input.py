"""Bad input never brings the market down: each offender is disconnected with a log line,
and a well-behaved Python agent and node client (npm yjs + y-websocket) keep working."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets
from pycrdt import Doc, Map, create_update_message
from websockets.exceptions import InvalidStatus

from igora.agent import Agent
from igora.config import market_address
from igora.errors import MarketUnreachable
from igora.lib0 import uint_bytes
from igora.protocol import MapName

from .conftest import Cluster
from .market_peers import NodePeer, agent, ensure_node_modules, entry, until

ROOM = "market"
MAX_MESSAGE = 64 * 1024
MAX_PER_ADDRESS = 16


@pytest.fixture(scope="module")
def market(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    ensure_node_modules()
    c = Cluster(tmp_path_factory.mktemp("bad-input"))
    c.market("--max-message", str(MAX_MESSAGE), "--max-per-address", str(MAX_PER_ADDRESS))
    yield c
    c.stop()


@pytest.fixture(scope="module")
def node(market: Cluster) -> Iterator[NodePeer]:
    peer = NodePeer(market.url, ROOM, market.tmp / "node-peer.log")
    yield peer
    peer.kill()


@pytest.fixture
async def py(market: Cluster, node: NodePeer) -> AsyncIterator[Agent]:
    await until(lambda: node.synced, 20, "the node client to sync")
    async with agent(market.url, ROOM, name="good-py") as a:
        seen: list[Any] = []
        a.on_change(lambda: seen.extend(s for s in a.awareness.states.values() if s))
        a.seen_states = seen  # type: ignore[attr-defined]
        await round_trip(a, node, "before")
        yield a


async def round_trip(py: Agent, node: NodePeer, tag: str) -> None:
    """A map entry and an awareness state each way between the Python agent and node."""
    assert node.alive(), "the node client died"
    with py.transaction():
        py.maps[MapName.TODOS][f"py-{tag}"] = {"id": f"py-{tag}", "tag": tag}
    node.set("todos", f"node-{tag}", {"id": f"node-{tag}", "tag": tag})
    py.set_state(tag=tag)
    node.aware({"type": "client", "tag": tag})
    await until(lambda: f"py-{tag}" in node.maps.get("todos", {}), 10, f"node to see py-{tag}")
    await until(lambda: entry(py, "todos", f"node-{tag}"), 10, f"python to see node-{tag}")
    await until(
        lambda: any(s.get("name") == "good-py" and s.get("tag") == tag for s in node.others()),
        10,
        "node to see python's awareness",
    )
    await until(
        lambda: any(
            p.state.get("name") == "node-peer" and p.state.get("tag") == tag for p in py.peers()
        ),
        10,
        "python to see node's awareness",
    )


async def offend(market: Cluster, frame: bytes | str, reason: str, code: int = 1003) -> None:
    """Send one bad frame on a fresh connection; it must be closed and logged (``reason``
    is a regular expression)."""
    async with websockets.connect(f"{market.url}/{ROOM}", max_size=None) as ws:
        port = ws.local_address[1]
        await ws.send(frame)
        with contextlib.suppress(websockets.ConnectionClosed):
            while True:  # the market's sync step 1 and awareness may come first
                await asyncio.wait_for(ws.recv(), 10)
        assert ws.close_code == code, (ws.close_code, ws.close_reason)
    line = re.compile(rf"127\.0\.0\.1:{port}: disconnected, {reason}")
    await until(lambda: line.search(market.procs[0].log()), 5, f"a log line {line.pattern!r}")


def update_message(**entries: Any) -> bytes:
    doc = Doc()
    todos = doc.get("todos", type=Map)
    for k, v in entries.items():
        todos[k] = v
    return create_update_message(doc.get_update())


def awareness_frame(raw_state: bytes, client_id: int = 987654) -> bytes:
    """A well-framed awareness message carrying ``raw_state`` as its state string."""
    uint = uint_bytes
    payload = uint(1) + uint(client_id) + uint(1) + uint(len(raw_state)) + raw_state
    return uint(1) + uint(len(payload)) + payload


# ------------------------------------------------------------------------------ frames


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"\xff\x00 garbage \x00\x01", "unknown message type 127"),
        (b"\x07\x07\x07", "unknown message type 7"),
        (b"\x00\x09\x01\x00", "unknown sync message type 9"),
        (b"\x00\x02\x0bhello world", "(bad|refused) update"),
        (b"\x00\x00\x03\xff\xff\xff", "bad update"),
        (b"\x01\x03\x01", "truncated message"),
    ],
    ids=[
        "unknown-type",
        "unknown-type-2",
        "unknown-sync",
        "garbage-update",
        "garbage-state-vector",
        "garbage-awareness",
    ],
)
async def test_garbage_bytes_disconnect_the_sender_only(
    market: Cluster, node: NodePeer, py: Agent, frame: bytes, reason: str
) -> None:
    await offend(market, frame, reason)
    await round_trip(py, node, "after-garbage")


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\x00\xff not even HTTP \x01\x02\r\n\r\n", "invalid HTTP request"),
        (
            b"GET /market HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: bad\r\nSec-WebSocket-Version: 13\r\n\r\n",
            r"bad websocket handshake \(HTTP 400\)",
        ),
    ],
    ids=["tcp-garbage", "bad-handshake"],
)
async def test_garbage_before_the_websocket_handshake_disconnects_the_sender_only(
    market: Cluster, node: NodePeer, py: Agent, payload: bytes, reason: str
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", market.port)
    port = writer.get_extra_info("sockname")[1]
    writer.write(payload)
    answer = await asyncio.wait_for(reader.read(), 10)  # the market answers, then closes
    writer.close()
    assert answer.startswith(b"HTTP/1.1 400")
    line = re.compile(rf"127\.0\.0\.1:{port}: disconnected, {reason}")
    await until(lambda: line.search(market.procs[0].log()), 5, f"a log line {line.pattern!r}")
    await round_trip(py, node, "after-tcp-garbage")


async def test_truncated_sync_message_disconnects_the_sender_and_changes_nothing(
    market: Cluster, node: NodePeer, py: Agent
) -> None:
    whole = update_message(truncated={"id": "truncated", "prompt": "x" * 200})
    await offend(market, whole[: len(whole) // 2], "truncated message")
    await round_trip(py, node, "after-truncated")
    assert entry(py, "todos", "truncated") is None
    assert "truncated" not in node.maps.get("todos", {})


async def test_text_frame_disconnects_the_sender(
    market: Cluster, node: NodePeer, py: Agent
) -> None:
    await offend(market, "hello, I speak JSON", r"text frame \(y-websocket speaks binary\)")
    await round_trip(py, node, "after-text")


async def test_message_over_the_size_limit_disconnects_the_sender(
    market: Cluster, node: NodePeer, py: Agent
) -> None:
    big = update_message(big={"id": "big", "prompt": "x" * (MAX_MESSAGE + 1000)})
    await offend(market, big, "message over the size limit", code=1009)
    await round_trip(py, node, "after-big")
    assert entry(py, "todos", "big") is None


@pytest.mark.parametrize(
    "raw",
    [
        b'{"name": "evil-truncated", "type": "worker"',
        b'{"name": "evil-nan", "x": NaN}',
        b'["evil-list"]',
        b'{"name": "evil-\xff\xfe"}',
        b"12",
    ],
    ids=["truncated-json", "nan", "list", "not-utf8", "number"],
)
async def test_malformed_awareness_json_is_not_forwarded(
    market: Cluster, node: NodePeer, py: Agent, raw: bytes
) -> None:
    await offend(market, awareness_frame(raw), "awareness state")
    await round_trip(py, node, "after-awareness")
    assert not [s for s in node.seen_states if "evil" in json.dumps(s)]
    assert not [s for s in py.seen_states if "evil" in json.dumps(s)]  # type: ignore[attr-defined]
    assert not [a for a in market.agents() if "evil" in json.dumps(a)]


# ------------------------------------------------------------------------------ floods


async def open_many(url: str, n: int) -> tuple[list[Any], int]:
    """Open ``n`` websockets at once; return the accepted ones and the number refused."""

    async def one() -> Any:
        try:
            return await websockets.connect(url, open_timeout=20)
        except InvalidStatus:
            return None

    results = await asyncio.gather(*(one() for _ in range(n)))
    accepted = [ws for ws in results if ws is not None]
    return accepted, n - len(accepted)


async def test_flood_from_one_address_is_refused_over_the_limit(
    market: Cluster, node: NodePeer, py: Agent
) -> None:
    accepted, refused = await open_many(f"{market.url}/{ROOM}", 3 * MAX_PER_ADDRESS)
    try:
        # py and node hold two of the address's places
        assert len(accepted) == MAX_PER_ADDRESS - 2 and refused == 2 * MAX_PER_ADDRESS + 2
        assert "connections from 127.0.0.1 already" in market.procs[0].log()
        await round_trip(py, node, "during-flood")
    finally:
        await asyncio.gather(*(ws.close() for ws in accepted))
    # once the flood is gone, newcomers are welcome again
    await until(lambda: market.status()["connections"] == 2, 10, "the flood to be closed")
    async with agent(market.url, ROOM, name="newcomer") as newcomer:
        await until(lambda: entry(newcomer, "todos", "py-during-flood"), 10, "a newcomer")


async def test_flood_over_the_total_limit_is_refused(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    try:
        c.market("--max-connections", "6", "--memory")
        async with agent(c.url, "room-a", name="a") as a, agent(c.url, "room-a", name="b") as b:
            accepted, refused = await open_many(f"{c.url}/room-b", 20)
            try:
                assert len(accepted) == 4 and refused == 16
                assert "refused, 6 connections already" in c.procs[0].log()
                late = Agent(
                    market_address(c.url, "room-a"),
                    type="client",
                    name="late",
                    style="normal",
                    connect_timeout=1,
                )
                with pytest.raises(MarketUnreachable, match="HTTP 403"):
                    await late.start()  # refused: it says why, it does not hang
                with a.transaction():
                    a.maps[MapName.TODOS]["still"] = {"id": "still"}
                await until(lambda: entry(b, "todos", "still"), 10, "b to see a's entry")
            finally:
                await asyncio.gather(*(ws.close() for ws in accepted))
        await until(lambda: c.status()["connections"] == 0, 10, "everyone to leave")
        async with agent(c.url, "room-a", name="again") as again:
            assert entry(again, "todos", "still") == {"id": "still"}
    finally:
        c.stop()
