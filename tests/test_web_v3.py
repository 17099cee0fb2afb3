"""The web page on a v3 room (docs/web.md, protocol-v3.md §12.8): a real market with a v3
room, a broker, two echo workers and a gateway, each with its own identity; Debian's
headless Chromium through Playwright reads the market view while an asker's tasks run.
The view comes from the market (``GET /rooms/ROOM/view``: ``dir``, ``who``, ``board``)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import urllib.request
from typing import Any

import pytest
from playwright.sync_api import BrowserContext

from igora.testing import Cluster
from tests.conftest import open_page
from tests.test_v3_roles import ROOM, asker, v3_room
from tests.test_v3_view import MARKER, worker_ids

pytestmark = pytest.mark.slow


def test_the_market_view_of_a_v3_room_shows_the_key_of_the_worker_that_answered(
    context: BrowserContext, cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    v3_room(cluster)
    workers = worker_ids(cluster)
    _, base = cluster.gateway("--room", ROOM, data=True)
    page = open_page(context, base, "market")
    for key, name in workers.items():
        row = page.wait_for_selector(f"#agents tr[data-type=worker][data-key='{key}']")
        assert row.get_attribute("data-name") == name
        assert key[:8] in row.inner_text() and "echo" in row.inner_text()
    page.wait_for_selector("#agents tr[data-type=broker]")

    # Playwright's sync API holds this thread's event loop: the asker runs in another.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answered = pool.submit(asyncio.run, _ask(cluster, monkeypatch, 3)).result(90)
    assert len(answered) == 3 and set(answered.values()) <= set(workers)
    for tid, worker in answered.items():
        # The card may show as done one view before the board names its worker.
        card = page.wait_for_selector(
            f"#board section[data-group=done] li[data-id='{tid}'][data-worker-key]"
        )
        assert card.get_attribute("data-worker-key") == worker
        text = card.inner_text()
        assert worker[:8] in text and workers[worker] in text and MARKER not in text
    page.wait_for_function(
        "document.querySelector('#board section[data-group=done] .count').textContent === '3'"
    )
    assert page.inner_text("#board section[data-group=waiting] .count") == "0"
    assert page.inner_text("#board section[data-group=running] .count") == "0"
    assert float(page.inner_text("#tasks-per-min")) >= 3
    assert not page.errors  # type: ignore[attr-defined]
    with urllib.request.urlopen(f"{base}/api/market", timeout=10) as r:
        snap: dict[str, Any] = json.loads(r.read())
    assert snap["protocol"] == 3 and snap["counts"]["done"] == 3
    assert {a["key"] for a in snap["agents"] if a["type"] == "worker"} == set(workers)
    assert MARKER not in json.dumps(snap)


async def _ask(cluster: Cluster, monkeypatch: pytest.MonkeyPatch, n: int) -> dict[str, str]:
    """``n`` tasks of an asker with its own identity; task id -> the worker it read the
    answer from."""
    answered: dict[str, str] = {}
    async with asker(cluster, "alice", monkeypatch) as a:
        for i in range(n):
            task = await a.submit(f"{MARKER} {i}", max_tokens=10)
            pieces = []
            async for piece in task.stream():
                pieces.append(piece)
                worker = a.v3.worker_of(task.id) if a.v3 is not None else None
                if worker is not None:
                    answered.setdefault(task.id, worker)
            assert "".join(pieces) == f"Echo: {MARKER} {i}"
    return answered
