"""Compatibility with the original JavaScript Igora agents (npm yjs + y-websocket)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from igora import Client, NoWorkerError

from .conftest import Cluster

JS = Path(__file__).parent / "js"


@pytest.fixture(scope="session")
def node_modules() -> Path:
    if shutil.which("node") is None:
        pytest.fail("node is required for the compatibility tests (scripts/test-tools.sh)")
    if not (JS / "node_modules" / "y-websocket").is_dir():
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=JS,
            check=True,
            timeout=300,
        )
    return JS / "node_modules"


def _lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_original_client_task_is_answered_by_our_broker_and_worker(
    node_modules: Path, cluster: Cluster
) -> None:
    cluster.market()
    cluster.broker()
    cluster.worker("--delay", "0.05", name="py-worker")
    cluster.wait_agents("worker", 1)
    words = " ".join(f"w{i}" for i in range(40))
    run = subprocess.run(
        ["node", str(JS / "original.mjs"), "client", cluster.url, "market", words],
        capture_output=True,
        text=True,
        timeout=90,
    )
    events = _lines(run.stdout)
    assert run.returncode == 0, run.stderr + run.stdout
    final = next(e for e in events if e["ev"] == "done")["task"]
    assert final["state"] == "done"
    assert final["response"] == "Echo: " + words
    assert final["attemps"] == 1 and final["worker"]
    # The original client reads partial answers from doing[id].response while it streams.
    partials = [e["response"] for e in events if e["ev"] == "partial" and e["response"]]
    assert partials, "no partial response was readable in doing[id]"
    assert all(final["response"].startswith(p) for p in partials)
    assert len(partials[0]) < len(final["response"])


async def test_original_worker_serves_our_client_through_our_broker(
    node_modules: Path, cluster: Cluster
) -> None:
    cluster.market()
    cluster.broker()
    worker = subprocess.Popen(
        ["node", str(JS / "original.mjs"), "worker", cluster.url, "market"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        cluster.wait_agents("worker", 1)
        async with Client(cluster.url) as client:
            pieces = [p async for p in await client.chat("bonjour tout le monde", stream=True)]
        assert "".join(pieces) == "Original worker says: bonjour tout le monde"
        assert len(pieces) > 1
    finally:
        worker.kill()
        worker.wait(5)


async def test_original_client_naming_a_model_nobody_serves_is_answered_by_a_text_worker(
    node_modules: Path, cluster: Cluster
) -> None:
    """The original OpenAI endpoint passes its client's ``model`` through (``gpt-3.5-turbo``):
    a task without ``protocol`` is served by any text worker, as the original served it,
    while a v2 client asking for that model gets a clear error within seconds."""
    cluster.market()
    cluster.broker()
    cluster.worker("--model", "echo", name="py-worker")
    cluster.wait_agents("worker", 1)
    run = subprocess.run(
        [
            "node",
            str(JS / "original.mjs"),
            "client",
            cluster.url,
            "market",
            "hello there",
            "gpt-3.5-turbo",
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert run.returncode == 0, run.stderr + run.stdout
    final = next(e for e in _lines(run.stdout) if e["ev"] == "done")["task"]
    assert final["state"] == "done" and final["response"] == "Echo: hello there"
    assert final["model"] == "gpt-3.5-turbo"  # the task is kept as its asker wrote it
    async with Client(cluster.url) as client:
        start = time.monotonic()
        with pytest.raises(NoWorkerError, match=r"gpt-3\.5-turbo"):
            await client.chat("hello there", model="gpt-3.5-turbo", wait_worker=1.0)
        assert time.monotonic() - start < 10
