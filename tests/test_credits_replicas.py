"""Credits on a market of three replicas (docs/credits.md §7): one ledger, kept by the
replica holding its lease, whatever replica the askers, the workers and the broker are
on. Every test starts its own ``redis-server`` and three ``igora market`` processes
sharing one ``--data`` folder (one market key, one ledger file); the ledger is read back
from that file."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from igora.client import Client
from igora.credits import pricing
from igora.credits.ledger import LEDGER_FILE, TAX_ACCOUNT, Kind, Ledger
from igora.identity import load_identity
from igora.task_handle import Answer
from igora.testing import Cluster, Proc, RedisServer, wait_until
from tests.test_credits_market import price
from tests.test_v3_replicas import urls

ROOM = "v3"
GRANT = pricing.DEFAULT_GRANT
HOLDS = "keeps the ledger"


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


def start(cluster: Cluster, redis: RedisServer, *worker: str) -> list[Proc]:
    """Three replicas with the open v3 room ROOM (claims without receipt settled after
    1.5 s), the broker on replica 0, echo workers w1 and w2 on replicas 1 and 2."""
    procs = cluster.replicas(redis.url, 3, "--v3-room", ROOM, "--receipt-wait", "1.5")
    cluster.broker("--market", urls(cluster, 0), "--room", ROOM, name="b1", data=True)
    for i, name in ((1, "w1"), (2, "w2")):
        cluster.worker("--market", urls(cluster, i), "--room", ROOM, *worker, name=name, data=True)
    cluster.wait_agents("worker", 2)
    cluster.wait_agents("broker", 1)
    return procs


def _holds(p: Proc) -> bool:
    return any(HOLDS in line and "no longer" not in line for line in p.log().splitlines())


def holder(cluster: Cluster, procs: list[Proc]) -> int:
    """The replica keeping the ledger (one, and only one, says so)."""
    wait_until(lambda: any(_holds(p) for p in procs), 20, "a replica keeping the ledger", cluster)
    held = [i for i, p in enumerate(procs) if _holds(p)]
    assert len(held) == 1, held
    return held[0]


def asker(cluster: Cluster, name: str, replica: int, monkeypatch: pytest.MonkeyPatch) -> Client:
    monkeypatch.setenv("IGORA_DATA", cluster.agent_data(name)["IGORA_DATA"])
    return Client(urls(cluster, replica), ROOM, name=name, timeout=90)


def book(cluster: Cluster) -> Ledger:
    return Ledger(cluster.data / LEDGER_FILE)


def spends(cluster: Cluster) -> list[Any]:
    with book(cluster) as ledger:
        return [e for e in ledger.entries(limit=100_000) if e.kind is Kind.SPEND]


def check_books(cluster: Cluster, answers: list[tuple[str, Answer]]) -> None:
    """Every answer paid once, at its price; the chain holds; balances sum to the grants
    less the tax."""
    wait_until(lambda: len(spends(cluster)) >= len(answers), 30, "every run paid", cluster)
    assert sorted(e.task for e in spends(cluster)) == sorted(a.task["id"] for _, a in answers)
    spent: dict[str, int] = {}
    earned: dict[str, int] = {}
    for who, answer in answers:
        spent[who] = spent.get(who, 0) + price(answer)
        worker = answer.task["worker"]
        earned[worker] = earned.get(worker, 0) + price(answer) - pricing.tax(price(answer))
    with book(cluster) as ledger:
        ledger.verify_chain()
        grants, tax = ledger.totals()
        balances = ledger.balances()
    for who, amount in spent.items():
        assert balances[who] == GRANT - amount, who
    for worker, amount in earned.items():
        assert balances[worker] == GRANT + amount, worker
    assert sum(v for k, v in balances.items() if k != TAX_ACCOUNT) == grants - tax


def test_tasks_on_three_replicas_are_paid_once_in_one_ledger(
    cluster: Cluster, redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Askers on every replica, workers on two, the broker on a third: one replica keeps
    the ledger, and every run is paid once from its receipt, whichever replica its claim
    came through; each asker's balance, asked through its own replica, is the ledger's;
    a transfer sent through a replica that does not keep the ledger is answered once on
    disk."""
    procs = start(cluster, redis)
    kept = holder(cluster, procs)

    async def main() -> list[tuple[str, Answer]]:
        clients = [asker(cluster, f"asker{i}", i, monkeypatch) for i in range(3)]
        for c in clients:
            await c.connect()
        try:
            got: list[tuple[str, Answer]] = []
            for c in clients:
                tasks = [await c.submit(f"{c.name} question {k}", max_tokens=20) for k in range(4)]
                got += [(c.id, await t.result()) for t in tasks]
            return got
        finally:
            for c in clients:
                await c.close()

    answers = asyncio.run(main())
    check_books(cluster, answers)
    # A transfer through a replica that does not keep the ledger: settled, then seen.
    sender = cluster.agent_data("asker0")["IGORA_DATA"]
    to = load_identity(Path(cluster.agent_data("asker1")["IGORA_DATA"]))[0].id
    other = next(i for i in range(3) if i != kept)
    market = f"ws://127.0.0.1:{cluster.ports[other]}"
    sent = subprocess.run(
        [
            sys.executable,
            "-m",
            "igora",
            "credits",
            "send",
            to,
            "1.5",
            "--market",
            market,
            "--room",
            ROOM,
            "--data",
            sender,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout.splitlines()[0] == f"sent 1.500 credits to {to}"
    with book(cluster) as ledger:
        moved = [e for e in ledger.entries(to, limit=50) if e.kind is Kind.TRANSFER]
    assert [e.amount for e in moved] == [1500]
    # Asked through that replica, asker1's balance and entries are the ledger's.
    data = cluster.agent_data("asker1")["IGORA_DATA"]
    shown = subprocess.run(
        [
            sys.executable,
            "-m",
            "igora",
            "credits",
            "--json",
            "--market",
            market,
            "--room",
            ROOM,
            "--data",
            data,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    with book(cluster) as ledger:
        expected = (ledger.balance(to), [e.seq for e in ledger.entries(to, limit=20)])
    got = json.loads(shown.stdout)
    assert (got["balance"], [e["seq"] for e in got["entries"]]) == expected
    assert all(_holds(p) == (i == kept) for i, p in enumerate(procs))


def test_an_asker_on_another_replica_that_leaves_without_receipt_is_charged(
    cluster: Cluster, redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record of what was delivered stays on the asker's replica; the holder asks the
    replicas for it when the worker's claim without receipt comes due, and settles it."""
    procs = start(cluster, redis)
    kept = holder(cluster, procs)
    where = next(i for i in range(3) if i != kept)

    async def main() -> tuple[str, Answer]:
        c = asker(cluster, "mallory", where, monkeypatch)
        await c.connect()
        assert c.v3 is not None
        c.v3.receipts = False
        try:
            task = await c.submit("read in full and never sign", max_tokens=20)
            return c.id, await task.result()
        finally:
            await c.close()

    who, answer = asyncio.run(main())
    wait_until(lambda: len(spends(cluster)) >= 1, 30, "the run paid from its record", cluster)
    (entry,) = spends(cluster)
    proof = json.loads(entry.proof)
    assert "receipt" not in proof and proof["delivery"]["final"] is True
    assert entry.account == who and entry.amount == -price(answer)


def test_kill_9_of_the_ledger_holder_loses_no_payment(
    cluster: Cluster, redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kill -9 of the replica keeping the ledger while tasks run: another takes the lease
    within its expiry and opens the same file; the claims that came meanwhile wait in
    the stream (or are sent again by the workers) and every run ends paid exactly once."""
    procs = start(cluster, redis, "--slots", "4", "--delay", "0.02")
    kept = holder(cluster, procs)
    where = next(i for i in range(3) if i != kept)

    async def main() -> list[tuple[str, Answer]]:
        async with asker(cluster, "alice", where, monkeypatch) as c:
            first = [await c.submit(f"before {k}", max_tokens=10) for k in range(6)]
            got = [(c.id, await t.result()) for t in first]
            procs[kept].kill(signal.SIGKILL)
            later = [await c.submit(f"after {k}", max_tokens=10) for k in range(10)]
            got += [(c.id, await t.result()) for t in later]
            return got

    answers = asyncio.run(main())
    survivors = [p for i, p in enumerate(procs) if i != kept]
    wait_for_holder = lambda: any(_holds(p) for p in survivors)  # noqa: E731
    wait_until(wait_for_holder, 30, "a surviving replica keeps the ledger", cluster)
    check_books(cluster, answers)


def test_redis_restarted_empty_mid_run_loses_no_payment(
    cluster: Cluster, redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis restarted empty while tasks run: the stream, the lease and the balances in
    Redis are gone; a replica takes the lease again, the claims that could not be sent
    are answered 503 and sent again by their workers, and every run is paid once."""
    procs = start(cluster, redis, "--slots", "4", "--delay", "0.02")
    holder(cluster, procs)

    async def main() -> list[tuple[str, Answer]]:
        async with asker(cluster, "alice", 1, monkeypatch) as c:
            first = [await c.submit(f"before {k}", max_tokens=30) for k in range(8)]
            await asyncio.sleep(0.3)
            await asyncio.to_thread(redis.restart, 1.0)
            got = [(c.id, await t.result()) for t in first]
            later = [await c.submit(f"after {k}", max_tokens=10) for k in range(6)]
            got += [(c.id, await t.result()) for t in later]
            return got

    answers = asyncio.run(main())
    check_books(cluster, answers)
