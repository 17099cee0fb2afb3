"""Broker policies: model matching, fairness, slots, one active broker."""

from __future__ import annotations

import asyncio
import re
import time

from igora import Client
from igora.broker.fairness import fair_order
from igora.broker.matching import pick_worker
from igora.protocol import Peer

from .conftest import Cluster


def _worker(cid: int, wid: str, models: list[str], slots: int = 1, state: str = "ready") -> Peer:
    return Peer(
        cid,
        {
            "id": wid,
            "type": "worker",
            "style": "text",
            "state": state,
            "protocol": 2,
            "models": [{"name": m} for m in models],
            "slots": slots,
        },
    )


def test_fair_order_interleaves_askers_and_favours_the_least_served() -> None:
    many = [{"id": f"a{i}", "asker": "A", "date": i} for i in range(100)]
    one = [{"id": "b0", "asker": "B", "date": 500}]
    order = [t["id"] for t in fair_order(many + one)]
    assert order[:2] == ["a0", "b0"]
    order = [t["id"] for t in fair_order(many + one, in_flight={"A": 3})]
    assert order[0] == "b0"
    assert order[1:4] == ["a0", "a1", "a2"]


def test_matching_respects_model_and_free_slots() -> None:
    a = _worker(1, "wa", ["alpha"], slots=2)
    b = _worker(2, "wb", ["beta"])
    assert pick_worker({"model": "beta"}, [a, b], {}) is b
    assert pick_worker({"model": "beta"}, [a, b], {"wb": 1}) is None
    assert pick_worker({"model": "gamma", "protocol": 2}, [a, b], {}) is None
    # An original agent's task naming a model nobody serves: any text worker answers it.
    assert pick_worker({"model": "gpt-3.5-turbo"}, [a, b], {}) in (a, b)
    assert pick_worker({"model": "beta"}, [a, b], {"wb": 1}) is None  # served: it waits
    assert pick_worker({}, [a, b], {"wa": 2}) is b  # no model: any text worker
    busy = _worker(3, "wc", ["beta"], state="busy")
    assert pick_worker({"model": "beta"}, [busy], {}) is None
    original = Peer(4, {"id": "wo", "type": "worker", "style": "text", "state": "working"})
    assert pick_worker({}, [original], {}) is None  # an original worker busy with its task


def _starts(cluster: Cluster) -> list[str]:
    ids = []
    for p in cluster.procs:
        ids += re.findall(r"task (\S+) started", p.log())
    return ids


async def test_task_naming_a_model_goes_only_to_a_worker_serving_it(cluster: Cluster) -> None:
    cluster.market()
    cluster.broker()
    cluster.worker("--model", "alpha", name="wa")
    cluster.worker("--model", "beta", name="wb")
    workers = {a["name"]: a["id"] for a in cluster.wait_agents("worker", 2)}
    async with Client(cluster.url) as client:
        tasks = [await client.submit(f"m{i}", model=m) for i in range(6) for m in ("alpha", "beta")]
        answers = await asyncio.gather(*(t.result() for t in tasks))
    for task, answer in zip(tasks, answers, strict=True):
        expected = workers["wa"] if task.task["model"] == "alpha" else workers["wb"]
        assert answer.task["worker"] == expected
        assert answer.task["model"] == task.task["model"]


async def test_one_asker_with_many_tasks_does_not_starve_another(cluster: Cluster) -> None:
    cluster.market()
    cluster.broker()
    cluster.worker("--delay", "0.01", name="slow")
    cluster.wait_agents("worker", 1)
    async with (
        Client(cluster.url, name="greedy") as greedy,
        Client(cluster.url, name="modest") as modest,
    ):
        many = [await greedy.submit("#repeat 10") for _ in range(30)]
        await asyncio.sleep(0.3)
        one = await modest.submit("#repeat 10")
        mine = await one.result()
        ends = [a.task["end"] for a in await asyncio.gather(*(t.result() for t in many))]
    before = sum(1 for e in ends if e < mine.task["end"])
    assert before <= 4, f"{before} of the greedy asker's tasks were served first"


async def test_worker_runs_at_most_its_slots_at_once(cluster: Cluster) -> None:
    cluster.market()
    cluster.broker()
    cluster.worker("--slots", "3", "--delay", "0.02", name="w3")
    cluster.wait_agents("worker", 1)
    async with Client(cluster.url) as client:
        tasks = [await client.submit("#repeat 40") for _ in range(9)]
        seen = 0
        gathering = asyncio.ensure_future(asyncio.gather(*(t.result() for t in tasks)))
        while not gathering.done():
            for w in client.workers():
                seen = max(seen, int(w.state.get("running") or 0))
            await asyncio.sleep(0.02)
        answers = gathering.result()
    assert all(a.text.startswith("tok0 ") for a in answers)
    assert seen == 3


async def test_two_brokers_assign_each_of_200_tasks_once(cluster: Cluster) -> None:
    cluster.market()
    cluster.broker(name="broker-a")
    cluster.broker(name="broker-b")
    cluster.worker("--slots", "4", name="w1")
    cluster.worker("--slots", "4", name="w2")
    cluster.wait_agents("worker", 2)
    cluster.wait_agents("broker", 2)
    deadline = time.monotonic() + 20
    while sum(1 for a in cluster.agents("broker") if a.get("leader")) != 1:
        assert time.monotonic() < deadline, "no single active broker"
        await asyncio.sleep(0.1)
    async with Client(cluster.url) as client:
        tasks = [await client.submit(f"task {i}") for i in range(200)]
        answers = await asyncio.gather(*(t.result() for t in tasks))
    assert [a.text for a in answers] == [f"Echo: task {i}" for i in range(200)]
    assert len({a.task["broker"] for a in answers}) == 1
    starts = _starts(cluster)
    assert sorted(starts) == sorted(t.id for t in tasks), "a task was started twice or never"
