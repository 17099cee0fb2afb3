"""Limits against floods (issue 20, findings 3 and 4): rooms per market and per address,
and a deadline on HTTP request headers (market and gateway)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from .conftest import Cluster, Proc

pytestmark = pytest.mark.timeout(180)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def open_room(url: str) -> str:
    """Join a room; "ok" once the market greets, else "refused: <close reason>"."""
    async with connect(url, open_timeout=10) as ws:
        try:
            await asyncio.wait_for(ws.recv(), 10)
            return "ok"
        except ConnectionClosed as exc:
            assert exc.rcvd is not None and exc.rcvd.code == 1013
            return f"refused: {exc.rcvd.reason}"


async def open_rooms(base: str, names: list[str], batch: int = 50) -> Counter[str]:
    """Join each room and leave it, ``batch`` at a time."""
    out: Counter[str] = Counter()
    for i in range(0, len(names), batch):
        out.update(await asyncio.gather(*(open_room(f"{base}/{n}") for n in names[i : i + batch])))
    return out


async def test_3000_rooms_from_one_address_are_refused_past_the_limit_and_memory_stays_bounded(
    cluster: Cluster,
) -> None:
    market = cluster.market("--max-rooms-per-address", "50")
    await open_room(f"{cluster.url}/warm-up")  # the first room loads the code paths
    before = rss_kb(market.pid)
    seen = await open_rooms(cluster.url, [f"room-{i}" for i in range(3000)])
    assert seen == {
        "ok": 49,  # the warm-up room counts
        "refused: 50 rooms opened from 127.0.0.1 are in memory already": 2951,
    }
    assert len(cluster.status()["rooms"]) == 50
    grown = rss_kb(market.pid) - before
    # Unbounded, the 3,000 rooms took ~123 MB (~41 KB each); 50 rooms and 3,000
    # refused connections stay far below that.
    assert grown < 30_000, f"the market grew by {grown} kB"
    assert await open_room(f"{cluster.url}/room-7") == "ok"  # a loaded room stays open
    assert "refused, 50 rooms opened from 127.0.0.1" in market.log()


async def test_past_max_rooms_idle_rooms_make_space_and_new_rooms_wait_for_none(
    cluster: Cluster,
) -> None:
    cluster.market("--max-rooms", "20", "--max-rooms-per-address", "1000")
    seen = await open_rooms(cluster.url, [f"r-{i}" for i in range(200)], batch=10)
    assert seen == {"ok": 200}  # each left at once: the idle ones leave memory
    assert len(cluster.status()["rooms"]) <= 20
    # Twenty rooms held open: no room is idle, a twenty-first is refused.
    held = [await connect(f"{cluster.url}/held-{i}") for i in range(20)]
    try:
        for ws in held:
            await asyncio.wait_for(ws.recv(), 10)
        assert (
            await open_room(f"{cluster.url}/one-more")
            == "refused: 20 rooms in memory already, none idle"
        )
        assert await open_room(f"{cluster.url}/held-3") == "ok"  # joining a loaded room
    finally:
        for ws in held:
            await ws.close()


def half_open(port: int, n: int) -> list[socket.socket]:
    """``n`` sockets that send the start of a request and never its end."""
    out = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        out.append(s)
    return out


def closed_within(sockets: list[socket.socket], seconds: float, answer: bytes = b"") -> int:
    """How many of ``sockets`` the server closed within ``seconds``, having sent nothing
    but ``answer`` (a reset may swallow it: the request's bytes were left unread)."""
    end = time.monotonic() + seconds
    closed = 0
    for s in sockets:
        got = b""
        with contextlib.suppress(TimeoutError, socket.timeout):
            while True:
                s.settimeout(max(0.01, end - time.monotonic()))
                try:
                    data = s.recv(4096)
                except ConnectionResetError:
                    data = b""
                if not data:
                    closed += got == b"" or got.startswith(answer)
                    break
                got += data
        s.close()
    return closed


async def test_half_open_requests_are_closed_after_the_header_timeout_on_the_market(
    cluster: Cluster,
) -> None:
    market = cluster.market("--header-timeout", "1", "--max-per-address", "40")
    async with connect(f"{cluster.url}/market") as agent:  # a websocket is not a request
        slow = half_open(cluster.port, 30)
        started = time.monotonic()
        early = closed_within(slow[:5], 0.5)
        assert early == 0, "closed before the timeout"
        assert closed_within(slow[5:], 10) == 25
        assert time.monotonic() - started < 10
        await asyncio.sleep(0.5)
        await agent.send(b"\x00\x00\x01\x00")  # sync step 1: the market answers
        assert await asyncio.wait_for(agent.recv(), 5)
    # Over --max-per-address half-open connections from one address: refused at once.
    flood = half_open(cluster.port, 60)
    assert closed_within(flood[40:], 0.9, b"HTTP/1.1 403 Forbidden") == 20
    closed_within(flood[:40], 0.1)
    assert "request headers not complete after 1 s" in market.log()
    assert "still sending their headers" in market.log()


def test_a_slow_second_request_on_a_keep_alive_connection_is_closed_too(
    cluster: Cluster,
) -> None:
    cluster.market("--header-timeout", "1")
    with socket.create_connection(("127.0.0.1", cluster.port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")  # "Okay", connection kept
        time.sleep(1.5)  # longer than the header timeout: an idle connection is no request
        s.sendall(b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
        assert closed_within([s], 10) == 1


@pytest.fixture
def gateway(cluster: Cluster) -> tuple[int, Proc]:
    """A market and a gateway (header timeout 1 s); the gateway's port and process."""
    cluster.market()
    proc, base = cluster.gateway("--header-timeout", "1", timeout=20)
    return urlsplit(base).port or 0, proc


def test_half_open_requests_are_closed_after_the_header_timeout_on_the_gateway(
    gateway: tuple[int, Proc],
) -> None:
    port, proc = gateway
    slow = half_open(port, 20)
    assert closed_within(slow, 10) == 20
    assert "request headers not complete after 1 s" in proc.log()


@pytest.mark.parametrize(
    "path",
    [
        "/static/a%00b",
        "/static/" + "a" * 5000,
        "/static/" + "a/" * 2500,
        "/static/nope.js",
        "/static/../routes.py",
        "/static/%2e%2e/routes.py",
    ],
)
def test_gateway_answers_404_for_a_static_path_it_cannot_serve(
    gateway: tuple[int, Proc],
    path: str,
) -> None:
    port, proc = gateway
    r = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=10)
    assert r.status_code == 404, r.text[:200]
    error = r.json()["error"]
    assert error["code"] == "not_found" and len(error["message"]) < 120
    assert httpx.get(f"http://127.0.0.1:{port}/static/app.js", timeout=10).status_code == 200
    assert "Traceback" not in proc.log() and "\x00" not in proc.log()
