"""What a v3 room shows of itself (docs/protocol-v3.md §12.8): the broker's ``board``,
the market's ``GET /rooms/ROOM/view`` and ``igora status``, against a real market, a
broker, two echo workers and askers with their own identities."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from pycrdt import Map

from igora.identity import load_identity
from igora.testing import Cluster, wait_for, wait_until
from igora.v3 import view as room_view
from igora.v3.board import BOARD, RECENT, SUMMARY
from igora.v3.session import Session
from tests.test_v3_roles import ROOM, SLOW, asker, connected, v3_room
from tests.v3_peers import new_identity

MARKER = "QZX-board-marker-7731"
NAMES = ("b1", "w1", "alice", "gateway", "eve")


def view(cluster: Cluster, room: str = ROOM) -> dict[str, Any]:
    url = f"http://127.0.0.1:{cluster.port}/rooms/{room}/view"
    with urllib.request.urlopen(url, timeout=10) as r:
        body: dict[str, Any] = json.loads(r.read())
    return body


def board_bytes(cluster: Cluster) -> int:
    rooms = [r for r in cluster.status()["rooms"] if r["name"] == ROOM]
    return int(rooms[0]["boardBytes"])


def done(cluster: Cluster, n: int) -> bool:
    board = view(cluster)["board"]
    return board is not None and board["counts"]["done"] >= n


def status(cluster: Cluster, *extra: str, room: str = ROOM) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "igora", "status", "--market", cluster.url, "--room", room, *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )


def worker_ids(cluster: Cluster) -> dict[str, str]:
    return {load_identity(Path(cluster.agent_data(n)["IGORA_DATA"]))[0].id: n for n in ("w1", "w2")}


def test_the_board_names_the_worker_that_answered_and_holds_no_text(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    v3_room(cluster, *SLOW)
    workers = worker_ids(cluster)

    async def main() -> dict[str, str]:
        a, b = await connected(cluster, monkeypatch)
        answered: dict[str, str] = {}  # task id -> the worker the asker read it from
        try:

            async def one(client: Any, i: int) -> None:
                task = await client.submit(f"{MARKER} question {i}", max_tokens=20)
                pieces = []
                async for piece in task.stream():
                    pieces.append(piece)
                    answered.setdefault(task.id, client.v3.worker_of(task.id))
                assert "".join(pieces) == f"Echo: {MARKER} question {i}"

            await asyncio.gather(*(one(c, i) for i, c in enumerate([a, b] * 3)))
        finally:
            await a.close()
            await b.close()
        return answered

    answered = asyncio.run(main())
    assert set(answered.values()) <= set(workers) and len(answered) == 6
    wait_until(lambda: done(cluster, 6), 20, lambda: json.dumps(view(cluster)), cluster)
    seen = view(cluster)
    rows = {t["id"]: t for t in seen["board"]["tasks"]}
    for tid, worker in answered.items():
        assert rows[tid]["worker"] == worker and rows[tid]["state"] == "done", rows[tid]
        assert rows[tid]["tokens"] and rows[tid]["end"] >= rows[tid]["start"]
    assert {w["id"]: w["name"] for w in seen["workers"]} == workers
    assert seen["broker"]["id"] in {x["id"] for x in seen["agents"] if x["type"] == "broker"}
    assert MARKER not in json.dumps(seen) and MARKER not in json.dumps(cluster.status())

    async def read_board() -> None:
        """Any member reads the board, through the protocol; its bytes hold no text."""
        reader = Session(f"{cluster.url}/{ROOM}", new_identity(), heartbeat=1.0)
        async with reader:
            reader.subscribe(BOARD)
            doc = await wait_for(lambda: reader.docs.get(BOARD), 10, "the board")
            summary = await wait_for(
                lambda: doc.get(BOARD, type=Map).get(SUMMARY), 10, "its summary"
            )
            assert summary["counts"]["done"] >= 6
            assert MARKER.encode() not in doc.get_update()

    asyncio.run(read_board())


def test_the_board_stays_bounded_after_many_tasks(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    v3_room(cluster)

    async def run(n: int) -> None:
        a = asker(cluster, "alice", monkeypatch)
        async with a:
            texts = [f"{MARKER} {i}" for i in range(n)]
            answers = await asyncio.gather(*(a.chat(t, max_tokens=10) for t in texts))
            assert answers == [f"Echo: {t}" for t in texts]

    batch = RECENT + 20
    asyncio.run(run(batch))
    wait_until(lambda: done(cluster, batch), 30, f"{batch} tasks on the board", cluster)
    first = board_bytes(cluster)
    asyncio.run(run(2 * batch))
    wait_until(lambda: done(cluster, 3 * batch), 30, f"{3 * batch} tasks on the board", cluster)
    board = view(cluster)["board"]
    assert len(board["tasks"]) == RECENT
    assert board["counts"]["done"] == 3 * batch and board["models"]["*"]["done"] == 3 * batch
    summary_bytes = len(json.dumps(board))
    # the market's copy is one summary, as long after 210 tasks as after 70
    assert board_bytes(cluster) <= max(first, summary_bytes) * 1.2, (first, board_bytes(cluster))
    assert MARKER not in json.dumps(board)


def test_the_next_lease_holder_rewrites_the_board(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The board is the lease holder's: after a failover the new holder's summary (its
    epoch, its counts) replaces the last one of the broker that died."""
    brokers, _ = v3_room(cluster, brokers=2)

    async def chat(text: str) -> None:
        async with asker(cluster, "alice", monkeypatch) as a:
            assert await a.chat(text, max_tokens=10) == f"Echo: {text}"

    asyncio.run(chat("before"))
    wait_until(lambda: done(cluster, 1), 20, "a task done on the board", cluster)
    first = view(cluster)["board"]
    holder = next(b for b in brokers if "lease granted" in b.log())
    holder.kill(signal.SIGKILL)
    asyncio.run(chat("after"))

    def rewritten() -> dict[str, Any] | None:
        board = view(cluster)["board"]
        return board if board["epoch"] > first["epoch"] and board["counts"]["done"] else None

    board = wait_until(rewritten, 30, lambda: json.dumps(view(cluster)), cluster)
    assert board["counts"]["done"] == 1 and board["since"] > first["since"]
    assert board["tasks"][0]["worker"] in worker_ids(cluster)


def test_igora_status_shows_a_v3_room(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    v3_room(cluster)
    workers = worker_ids(cluster)

    async def main() -> None:
        async with asker(cluster, "alice", monkeypatch) as a:
            assert await a.chat("for the status", max_tokens=10) == "Echo: for the status"

    asyncio.run(main())
    wait_until(lambda: done(cluster, 1), 20, "a task done on the board", cluster)
    out = status(cluster)
    assert out.returncode == 0, out.stderr
    assert "protocol 3" in out.stdout
    for key, name in workers.items():
        line = next(x for x in out.stdout.splitlines() if key in x and x.startswith("worker"))
        assert f" {name} " in line and "echo" in line and "/1" in line
    assert "active" in next(x for x in out.stdout.splitlines() if x.startswith("broker"))
    counts = out.stdout.splitlines().index(
        next(x for x in out.stdout.splitlines() if "waiting" in x)
    )
    assert out.stdout.splitlines()[counts + 1].split()[:3] == ["0", "0", "1"]
    as_json = json.loads(status(cluster, "--json").stdout)
    assert as_json["protocol"] == 3 and as_json["counts"]["done"] == 1
    assert as_json["models"] == {"*": {"waiting": 0, "running": 0, "done": 1}}
    assert as_json["tasks"][0]["worker"] in workers and as_json["tasks"][0]["state"] == "done"
    assert "for the status" not in json.dumps(as_json)


def test_the_view_of_a_room_it_cannot_show_says_why(cluster: Cluster) -> None:
    """A v2 room, a v3 room nobody joined: 404 with the reason; ``igora status`` on the
    latter says it in one line, exit 2."""
    cluster.market("--v3-room", ROOM)
    for room, why in (("market", "speaks protocol 2"), (ROOM, "not in memory")):
        with pytest.raises(urllib.error.HTTPError) as err:
            view(cluster, room)
        assert err.value.code == 404
        assert why in json.loads(err.value.read())["error"]["message"]
    out = status(cluster)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "not in memory" in out.stderr and len(out.stderr.strip().splitlines()) == 1


# ------------------------------------------------- who may look (docs/security.md §5)
def igora_as(folder: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``igora ARGS`` with the identity of data folder ``folder``."""
    return subprocess.run(
        [sys.executable, "-m", "igora", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "IGORA_DATA": folder},
    )


def operator(cluster: Cluster, *args: str) -> None:
    """``igora market ARGS --data`` the market's folder, which must succeed."""
    done = igora_as(str(cluster.data), "market", *args, "--data", str(cluster.data))
    assert done.returncode == 0, done.stderr


def test_a_members_only_market_shows_its_room_to_members_only(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An outsider (no key, or a key that is no member's) learns from the market's HTTP
    routes neither who is in the room nor what ran in it; a member's ``igora status``
    and a member gateway's web page show it all; a banned member is shut out."""
    ids = {n: load_identity(Path(cluster.agent_data(n)["IGORA_DATA"]))[0].id for n in NAMES}
    cluster.market("--secure", "--broker-key", ids["b1"])  # --members list: the default
    for name in ("b1", "w1", "alice", "gateway"):
        igora_as(
            str(cluster.data), "market", "members", "add", ids[name], "--data", str(cluster.data)
        )
    cluster.broker("--room", ROOM, name="b1", data=True)
    cluster.worker("--room", ROOM, name="w1", data=True)
    cluster.wait_agents("worker", 1)  # asked as the market itself (igora.testing)

    async def chat() -> None:
        async with asker(cluster, "alice", monkeypatch) as a:
            assert await a.chat(f"{MARKER} members", max_tokens=10) == f"Echo: {MARKER} members"

    asyncio.run(chat())

    # The outsider's side: HTTP, with no identity at all.
    with pytest.raises(urllib.error.HTTPError) as err:
        view(cluster)
    assert err.value.code == 403
    refusal = json.loads(err.value.read())
    assert refusal["error"]["code"] == "members_only", refusal
    room = next(r for r in cluster.status()["rooms"] if r["name"] == ROOM)
    assert "agents" not in room and room["identities"] == 2  # counts stay: b1, w1
    for body in (json.dumps(refusal), json.dumps(cluster.status())):
        assert not any(i in body for i in ids.values()) and "w1" not in body
        assert MARKER not in body
    # ... and with a key the market does not know: refused before it can ask.
    out = igora_as(
        cluster.agent_data("eve")["IGORA_DATA"], "status", "--market", cluster.url, "--room", ROOM
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "not a member of this market" in out.stderr and ids["w1"] not in out.stdout + out.stderr

    # A member sees the room: the worker, the broker, the task done.
    alice_data = cluster.agent_data("alice")["IGORA_DATA"]

    def member_status() -> subprocess.CompletedProcess[str]:
        return igora_as(alice_data, "status", "--market", cluster.url, "--room", ROOM, "--json")

    def one_done() -> dict[str, Any] | None:
        out = member_status()
        assert out.returncode == 0, out.stderr
        shown: dict[str, Any] = json.loads(out.stdout)
        return shown if shown["counts"]["done"] >= 1 else None

    shown = wait_until(one_done, 20, "the task done in a member's igora status", cluster)
    assert {a["key"]: a["type"] for a in shown["agents"]}[ids["w1"]] == "worker"
    assert shown["broker"]["id"] == ids["b1"] and shown["tasks"][0]["worker"] == ids["w1"]
    assert MARKER not in json.dumps(shown)

    # A member gateway's web page shows it too, over the gateway's own connection.
    _, base = cluster.gateway("--room", ROOM, data=True)

    def page_sees_the_worker() -> dict[str, Any] | None:
        with urllib.request.urlopen(f"{base}/api/market", timeout=10) as r:
            snap: dict[str, Any] = json.loads(r.read())
        workers = [a for a in snap["agents"] if a["type"] == "worker"]
        return snap if workers and workers[0]["key"] == ids["w1"] else None

    snap = wait_until(page_sees_the_worker, 20, "the worker on the gateway's page", cluster)
    assert snap["error"] is None and snap["counts"]["done"] >= 1

    # Banned: the member's next look is refused (the market reads its bans every second).
    igora_as(
        str(cluster.data),
        "market",
        "ban",
        ids["alice"],
        "--reason",
        "leaks",
        "--data",
        str(cluster.data),
    )

    def refused() -> str | None:
        out = member_status()
        return out.stderr if out.returncode == 2 else None

    why = wait_until(refused, 10, "alice's igora status refused", cluster)
    assert "banned: leaks" in why and "Traceback" not in why


def test_an_open_market_shows_the_same_view_over_http_and_its_connections(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a room any identity may join, the view stays public over HTTP (anyone could
    join and ask), and ``CONTROL view`` answers the same object, once per ask."""
    v3_room(cluster)

    async def main() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        over_http = await asyncio.to_thread(view, cluster)
        async with Session(f"{cluster.url}/{ROOM}", new_identity(), data=cluster.dir) as s:
            asked = [await room_view.ask(s) for _ in range(3)]
        return over_http, asked

    over_http, asked = asyncio.run(main())
    assert over_http["op"] == "view" and {w["name"] for w in over_http["workers"]} == {"w1", "w2"}
    for answer in asked:
        assert answer["workers"] == over_http["workers"] and answer["name"] == ROOM
        assert answer["market"] == cluster.status()["market"]["id"]
    assert any(a["type"] == "broker" for a in asked[-1]["agents"])
