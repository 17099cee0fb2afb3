"""Credits on a running market (docs/credits.md, protocol-v3.md §12 step 7): a v3 room of a
real market with its ledger, a broker, echo workers and askers through ``igora.Client``,
each agent its own identity. What is paid is read back from the market's ledger file."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from igora import Client
from igora.credits import pricing
from igora.credits.ledger import LEDGER_FILE, TAX_ACCOUNT, Kind, Ledger
from igora.credits.transfer import TransferOrder
from igora.engines.echo import PARAMS as ECHO_PARAMS
from igora.identity import Identity, load_identity
from igora.task_handle import Answer
from igora.testing import Cluster, Proc, bounded, wait_for, wait_until
from igora.v3 import asker as asker_module
from igora.v3.header import sign_header
from igora.v3.session import Event, EventKind, Session
from igora.v3.wire import Code

ROOM = "v3"
GRANT = 100 * pricing.MILLI
RECEIPT_WAIT = "1.5"


def start(cluster: Cluster, workers: int = 2, *market: str, slots: int = 1) -> Proc:
    """A market whose room ROOM speaks protocol 3, a broker and ``workers`` echo workers;
    the market's process."""
    proc = cluster.market("--v3-room", ROOM, "--receipt-wait", RECEIPT_WAIT, *market)
    cluster.broker("--room", ROOM, name="b1", data=True)
    for i in range(workers):
        cluster.worker("--room", ROOM, "--slots", str(slots), name=f"w{i + 1}", data=True)
    cluster.wait_agents("worker", workers)
    cluster.wait_agents("broker", 1)
    return proc


def identity(cluster: Cluster, name: str) -> Identity:
    return load_identity(Path(cluster.agent_data(name)["IGORA_DATA"]))[0]


async def asker(cluster: Cluster, name: str, monkeypatch: pytest.MonkeyPatch) -> Client:
    """A connected client with its own identity."""
    monkeypatch.setenv("IGORA_DATA", cluster.agent_data(name)["IGORA_DATA"])
    client = Client(cluster.url, ROOM, name=name, timeout=60)
    await client.connect()
    assert client.v3 is not None
    return client


def ledger(cluster: Cluster) -> Ledger:
    return Ledger(cluster.data / LEDGER_FILE)


def balances(cluster: Cluster) -> dict[str, int]:
    with ledger(cluster) as book:
        return book.balances()


def runs(cluster: Cluster) -> list[Any]:
    """The ``spend`` entries: one per run settled."""
    with ledger(cluster) as book:
        return [e for e in book.entries(limit=100_000) if e.kind is Kind.SPEND]


def price(answer: Answer) -> int:
    usage = answer.usage
    return pricing.price(usage["promptTokens"], usage["completionTokens"], ECHO_PARAMS)


def settled(cluster: Cluster, n: int, timeout: float = 30) -> list[Any]:
    """Wait until ``n`` runs are settled in the ledger (no more: checked after a pause)."""
    wait_until(lambda: len(runs(cluster)) >= n, timeout, cluster.logs)
    return runs(cluster)


async def ask(client: Client, texts: list[str]) -> list[Answer]:
    tasks = [await client.submit(t, max_tokens=40) for t in texts]
    return list(await asyncio.gather(*(t.result() for t in tasks)))


class Rogue:
    """A second connection of a worker's identity, sending claims of its own making."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.answers: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        session.observe(self._notice)

    def _notice(self, event: Event) -> None:
        if event.kind is EventKind.NOTICE and event.code in (
            Code.CREDITS,
            Code.CREDITS_PENDING,
            Code.CREDITS_REFUSED,
        ):
            self.answers.put_nowait(json.loads(event.text))

    async def claim(self, body: dict[str, Any]) -> dict[str, Any]:
        assert self.session.control({"op": "claim", **body})
        return await bounded(self.answers.get(), 10, "the market's answer to a claim")


def test_served_tasks_move_balances_by_exactly_their_price(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every run is paid once, from the asker's receipt: the asker's balance goes down by
    the rule's price of the usage it received, the worker's up by that price less 2 %
    tax; ``igora credits`` shows it; the ledger's audit holds."""
    start(cluster)

    async def main() -> list[tuple[str, Answer]]:
        a = await asker(cluster, "alice", monkeypatch)
        b = await asker(cluster, "bob", monkeypatch)
        try:
            got_a = await ask(a, [f"question {i} from alice" for i in range(6)])
            got_b = await ask(b, [f"a longer question number {i} from bob" for i in range(5)])
            return [(a.id, x) for x in got_a] + [(b.id, x) for x in got_b]
        finally:
            await a.close()
            await b.close()

    answers = asyncio.run(main())
    entries = settled(cluster, len(answers))
    assert len(entries) == len(answers)  # once each
    assert all("receipt" in json.loads(e.proof) for e in entries)
    spent: dict[str, int] = {}
    earned: dict[str, int] = {}
    for who, answer in answers:
        worker = answer.task["worker"]
        assert answer.usage["completionTokens"] > 0
        spent[who] = spent.get(who, 0) + price(answer)
        earned[worker] = earned.get(worker, 0) + price(answer) - pricing.tax(price(answer))
    book = balances(cluster)
    for who, amount in spent.items():
        assert book[who] == GRANT - amount
    for worker, amount in earned.items():
        assert book[worker] == GRANT + amount
    assert book[TAX_ACCOUNT] == sum(pricing.tax(price(x)) for _, x in answers)
    with ledger(cluster) as audited:
        audited.verify_chain()
        grants, tax = audited.totals()
    assert sum(v for k, v in book.items() if k != TAX_ACCOUNT) == grants - tax
    alice = cluster.agent_data("alice")["IGORA_DATA"]
    shown = subprocess.run(
        [
            sys.executable,
            "-m",
            "igora",
            "credits",
            "--data",
            alice,
            "--ledger",
            str(cluster.data / LEDGER_FILE),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    expected = pricing.credits_text(GRANT - spent[identity(cluster, "alice").id])
    assert shown.stdout.splitlines()[0] == f"balance: {expected}"
    # From another machine: the same, asked of the market over alice's connection.
    local, remote = (
        subprocess.run(
            [sys.executable, "-m", "igora", "credits", "--data", alice, "--json", *where],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        for where in (
            ["--ledger", str(cluster.data / LEDGER_FILE)],
            ["--market", cluster.url, "--room", ROOM],
        )
    )
    assert json.loads(remote) == json.loads(local)
    assert len(json.loads(remote)["entries"]) == 1 + 6  # her grant and her six runs


def test_a_worker_replaying_inflating_or_inventing_gains_nothing(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Claims a worker makes up on its own connection: each refused with its reason, or
    settled already; no balance moves, even after ``--receipt-wait``."""
    start(cluster)

    async def serve() -> None:
        a = await asker(cluster, "alice", monkeypatch)
        try:
            await ask(a, ["pay this once", "and this one"])
        finally:
            await a.close()

    asyncio.run(serve())
    entry = settled(cluster, 2)[0]
    proof = json.loads(entry.proof)
    receipt, header = proof["receipt"], proof["header"]
    worker = next(w for w in ("w1", "w2") if identity(cluster, w).id == receipt["worker"])
    other = identity(cluster, "w2" if worker == "w1" else "w1")
    before = balances(cluster)
    pt, ct = receipt["promptTokens"], receipt["completionTokens"]

    async def rogue(me: Identity) -> Rogue:
        session = Session(f"{cluster.url}/{ROOM}", me, name="rogue")
        await session.start()
        return Rogue(session)

    async def main() -> None:
        mine = await rogue(identity(cluster, worker))
        theirs = await rogue(other)
        try:
            claim = {"header": header, "attempt": receipt["attempt"], "receipt": receipt}
            # a receipt replayed: the run is paid already
            assert (await mine.claim(claim))["result"] == "duplicate"
            # tokens inflated: the count is inside the asker's signature
            inflated = {**receipt, "completionTokens": ct * 10}
            inflated["price"] = pricing.price(pt, ct * 10, ECHO_PARAMS)
            answer = await mine.claim({**claim, "receipt": inflated})
            assert (answer["result"], answer["reason"]) == ("refused", "receipt_signature")
            # the same without receipt: held for --receipt-wait, then the run is paid already
            usage = {"promptTokens": 10**6, "completionTokens": 10**6}
            unsigned = {"header": header, "attempt": 1, "usage": usage, "run": receipt["run"]}
            assert (await mine.claim(unsigned))["result"] == "pending"
            # another worker's receipt: the claimer is not its worker
            answer = await theirs.claim(claim)
            assert (answer["result"], answer["reason"]) == ("refused", "wrong_worker")
            # an invented task: a header the asker did not sign
            forged = {**header, "id": "inventedTask0001"}
            answer = await mine.claim({**claim, "header": forged})
            assert (answer["result"], answer["reason"]) == ("refused", "header_signature")
            # a task the worker signs itself, as its own asker: nothing was delivered
            own = sign_header(identity(cluster, worker), {**header, "id": "inventedTask0002"})
            own_claim = {**unsigned, "header": own}
            assert (await mine.claim(own_claim))["result"] == "pending"
            await asyncio.sleep(float(RECEIPT_WAIT) + 1.5)
        finally:
            await mine.session.stop()
            await theirs.session.stop()

    asyncio.run(main())
    assert balances(cluster) == before
    assert len(runs(cluster)) == 2
    with ledger(cluster) as book:
        book.verify_chain()


def test_an_asker_that_reads_its_answer_and_leaves_without_receipt_is_charged(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that signs no receipt (a modified one) reads its answer in full and
    disconnects: the worker's claim is settled after ``--receipt-wait`` from what the
    market delivered, at the rule's price of the answer it read."""
    start(cluster, workers=1)

    async def main() -> tuple[str, Answer]:
        c = await asker(cluster, "mallory", monkeypatch)
        assert c.v3 is not None
        c.v3.receipts = False
        try:
            (answer,) = await ask(c, ["read in full and never sign"])
        finally:
            await c.close()
        return c.id, answer

    who, answer = asyncio.run(main())
    (entry,) = settled(cluster, 1)
    proof = json.loads(entry.proof)
    assert "receipt" not in proof and proof["delivery"]["final"] is True
    assert entry.account == who and entry.amount == -price(answer)
    assert balances(cluster)[who] == GRANT - price(answer)


def test_the_ledger_survives_a_market_kill_9(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The market is killed with SIGKILL while runs are being paid and started again on
    its data folder: every entry on disk before is there after, unchanged; every payment
    a worker was told of is there; no run is paid twice, though the workers send again
    the claims not answered and a worker replays one; the audit and the sum hold; tasks
    put after the restart are served."""
    market = start(cluster)
    before: list[Any] = []

    async def main() -> tuple[list[Answer], list[Any]]:
        a = await asker(cluster, "alice", monkeypatch)
        try:
            first = await ask(a, [f"before the kill {i}" for i in range(8)])
            await asyncio.to_thread(settled, cluster, 8)
            during = [await a.submit(f"during the kill {i}", max_tokens=40) for i in range(12)]
            await asyncio.sleep(0.3)
            market.kill(signal.SIGKILL)
            with ledger(cluster) as book:
                before.extend(book.entries(limit=100_000))
            await asyncio.to_thread(
                cluster.market, "--v3-room", ROOM, "--receipt-wait", RECEIPT_WAIT
            )
            middle = await asyncio.gather(
                *(asyncio.wait_for(t.result(), 20) for t in during), return_exceptions=True
            )
            # the room goes on: tasks put after the restart are served
            texts = [f"after the restart {i}" for i in range(4)]
            after = [await a.submit(x, max_tokens=40, wait_worker=30) for x in texts]
            served = await asyncio.gather(
                *(bounded(t.result(), 30, "a task put after the restart", cluster) for t in after)
            )
            assert [x.text for x in served] == [f"Echo: {x}" for x in texts]
            return first, list(middle)
        finally:
            await a.close()

    first, middle = asyncio.run(
        bounded(main(), 180, "the asker's tasks around the restart, then its close", cluster)
    )
    # the workers reconnect and send again the claims the killed market did not answer
    cluster.wait_agents("worker", 2)
    told = {
        line.split(" task ")[1].split()[0]
        for w in cluster.procs[2:4]
        for line in w.log().splitlines()
        if " paid " in line
    }
    wait_until(lambda: told <= {str(e.task) for e in runs(cluster)}, 30, cluster.logs)
    replayed = json.loads(before[-1].proof)

    async def replay() -> dict[str, Any]:
        receipt = replayed["receipt"]
        worker = next(w for w in ("w1", "w2") if identity(cluster, w).id == receipt["worker"])
        session = Session(f"{cluster.url}/{ROOM}", identity(cluster, worker), name="replay")
        await session.start()
        try:
            claim = {"header": replayed["header"], "attempt": receipt["attempt"]}
            return await Rogue(session).claim({**claim, "receipt": receipt})
        finally:
            await session.stop()

    replay_answer = asyncio.run(bounded(replay(), 60, "the replayed claim's answer", cluster))
    assert replay_answer["result"] == "duplicate"
    time.sleep(float(RECEIPT_WAIT) + 1.0)  # claims without receipt sent again: settled once
    with ledger(cluster) as book:
        entries = book.entries(limit=100_000)
        book.verify_chain()
        grants, tax = book.totals()
        total = sum(v for k, v in book.balances().items() if k != TAX_ACCOUNT)
    assert total == grants - tax
    kept = {e.seq: e for e in entries}
    assert before and all(kept.get(e.seq) == e for e in before), "an entry on disk changed"
    paid: dict[str, int] = {}
    for e in entries:
        if e.kind is Kind.SPEND:
            paid[str(e.task)] = paid.get(str(e.task), 0) + 1
    assert all(paid.get(a.task["id"]) == 1 for a in first)
    assert all(count == 1 for count in paid.values())
    assert told <= set(paid)
    done = [m for m in middle if isinstance(m, Answer)]
    assert all(paid.get(m.task["id"], 0) <= 1 for m in done)


def send_credits(
    cluster: Cluster, who: str, to: str, amount: str
) -> subprocess.CompletedProcess[str]:
    """``igora credits send TO AMOUNT`` as agent ``who``, through the market."""
    where = ["--market", cluster.url, "--room", ROOM]
    return subprocess.run(
        [sys.executable, "-m", "igora", "credits", "send", to, amount, *where],
        env={**os.environ, **cluster.agent_data(who)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_a_recent_balance_admits_without_asking_and_a_refusal_asks_again(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``can_pay`` (the gateway's 402) admits a request on a balance the market answered
    less than BALANCE_FRESH ago, without a round trip; a request that balance cannot
    pay is decided on a new answer. Here the asker gives its credits away on another
    connection while its answer is recent (BALANCE_FRESH made long)."""
    monkeypatch.setattr(asker_module, "BALANCE_FRESH", 600.0)
    start(cluster, 1)
    client = await asker(cluster, "alice", monkeypatch)
    try:
        assert client.v3 is not None
        alice, w1 = client.id, identity(cluster, "w1").id
        await wait_for(lambda: balances(cluster).get(alice) == GRANT, 20, cluster.logs)
        assert client.v3.recent_balance() is None  # nothing answered yet
        assert await client.can_pay("hello", max_tokens=10)
        assert client.v3.recent_balance() == GRANT
        sent = await asyncio.to_thread(send_credits, cluster, "alice", w1, "100")
        assert sent.returncode == 0, sent.stderr
        assert await client.can_pay("hello", max_tokens=10)  # the recent answer: no question
        assert client.v3.recent_balance() == GRANT
        assert not await client.can_pay("hello", max_tokens=10**6)  # over it: asked again
        assert client.v3.recent_balance() == 0
        assert not await client.can_pay("hello", max_tokens=10)
    finally:
        await client.close()


def test_the_gateway_answers_402_when_its_identity_cannot_pay(cluster: Cluster) -> None:
    """The identity the gateway speaks as gives all its credits away (``igora credits
    send``, a transfer through the market): a request then gets 402 with an OpenAI-style
    error body and no task runs; once a worker sends it credits, the same request is
    answered. A transfer of more than one has is refused, one line, exit 2."""
    start(cluster, 1)
    _, base = cluster.gateway("--room", ROOM, data=True)
    gateway, w1 = identity(cluster, "gateway").id, identity(cluster, "w1").id
    wait_until(lambda: balances(cluster).get(gateway) == GRANT, 20, cluster.logs)

    def send(who: str, to: str, amount: str) -> subprocess.CompletedProcess[str]:
        return send_credits(cluster, who, to, amount)

    sent = send("gateway", w1, "100")
    assert sent.returncode == 0 and sent.stdout.splitlines()[-1] == "balance: 0.000", sent.stderr
    request = {"model": "echo", "messages": [{"role": "user", "content": "pay first"}]}
    reply = httpx.post(f"{base}/v1/chat/completions", json=request, timeout=30)
    assert reply.status_code == 402
    error = reply.json()["error"]
    assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_credits")
    assert runs(cluster) == []
    refused = send("w1", gateway, "500")
    assert refused.returncode == 2 and refused.stdout == ""
    assert "cannot pay" in refused.stderr and len(refused.stderr.splitlines()) == 1
    assert send("w1", gateway, "50").returncode == 0
    book = balances(cluster)
    assert (book[gateway], book[w1]) == (50 * pricing.MILLI, GRANT + 50 * pricing.MILLI)
    reply = httpx.post(f"{base}/v1/chat/completions", json=request, timeout=30)
    assert reply.status_code == 200
    assert reply.json()["choices"][0]["message"]["content"] == "Echo: pay first"
    assert len(settled(cluster, 1)) == 1


def test_1000_tasks_of_10_askers_on_4_workers_keep_the_sum_of_balances(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under load, every run answered is paid once and the sum of all balances equals
    the grants minus the tax burned (the ledger's audit also rechecks every receipt)."""
    start(cluster, 4, slots=4)
    per_asker, in_flight = 100, 10

    async def one(client: Client, i: int) -> Answer:
        task = await client.submit(f"task {i} of {client.name}", max_tokens=20)
        return await task.result()

    async def load(client: Client) -> list[Answer]:
        gate = asyncio.Semaphore(in_flight)

        async def gated(i: int) -> Answer:
            async with gate:
                return await one(client, i)

        return list(await asyncio.gather(*(gated(i) for i in range(per_asker))))

    async def main() -> list[Answer]:
        clients = [await asker(cluster, f"asker{i}", monkeypatch) for i in range(10)]
        try:
            answers = await asyncio.gather(*(load(c) for c in clients))
        finally:
            for c in clients:
                await c.close()
        return [a for some in answers for a in some]

    answers = asyncio.run(main())
    assert len(answers) == 1_000
    entries = settled(cluster, 1_000, timeout=60)
    assert sorted(str(e.task) for e in entries) == sorted(a.task["id"] for a in answers)
    with ledger(cluster) as book:
        book.verify_chain()
        grants, tax = book.totals()
        book_balances = book.balances()
    assert sum(v for k, v in book_balances.items() if k != TAX_ACCOUNT) == grants - tax
    assert tax == sum(pricing.tax(price(a)) for a in answers)


def test_the_richer_askers_waiting_tasks_start_first(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One worker with one slot: the poorer asker (it gave 50 credits to the other:
    buckets 7 and 9 in ``standing``) submits first, the richer one right after; past
    the task already running, the richer one's run first, then the poorer one's (well
    within the ageing bound). The figures: ``python -m bench --only priority``."""
    cluster.market("--v3-room", ROOM)
    cluster.broker("--room", ROOM, name="b1", data=True)
    cluster.worker("--room", ROOM, "--delay", "0.05", name="w1", data=True)
    cluster.wait_agents("worker", 1)
    cluster.wait_agents("broker", 1)

    async def main() -> list[str]:
        rich = await asker(cluster, "rich", monkeypatch)
        poor = await asker(cluster, "poor", monkeypatch)
        ended: list[str] = []
        try:
            assert poor.v3 is not None
            market = str(poor.v3.session.market)
            order = TransferOrder.make(identity(cluster, "poor"), market, rich.id, 50_000)
            assert poor.v3.session.control({"op": "transfer", **order.to_json()})
            await wait_for(lambda: balances(cluster).get(rich.id) == 150_000, 20, "the transfer")
            await asyncio.sleep(0.5)  # standing reaches the broker (sent every 50 ms)

            async def one(client: Client, who: str, i: int) -> None:
                task = await client.submit(f"one two three four {who} {i}", max_tokens=20)
                await task.result()
                ended.append(who)

            first = [asyncio.create_task(one(poor, "poor", i)) for i in range(4)]
            await asyncio.sleep(0.05)
            second = [asyncio.create_task(one(rich, "rich", i)) for i in range(4)]
            await asyncio.gather(*first, *second)
        finally:
            await rich.close()
            await poor.close()
        return ended

    ended = asyncio.run(main())
    assert ended[1:] == ["rich"] * 4 + ["poor"] * 3, ended


def test_a_market_pinning_a_model_size_pays_by_it_and_stops_a_worker_that_disagrees(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--model-params echo=0.15``: the echo worker's own size (0.2) gives the same
    factor, so it serves and is paid the rule's price; a market pinning echo at 7B
    (factor 70) stops an echo worker at its advert, with the reason in its log and a
    failed exit, and lists none."""
    start(cluster, 1, "--model-params", "echo=0.15")

    async def main() -> Answer:
        client = await asker(cluster, "alice", monkeypatch)
        try:
            v3 = client.v3
            assert v3 is not None
            prices = await wait_for(v3.prices, 10, "the price rule in dir")
            assert prices["pinned"] == {"echo": "0.15"}
            (answer,) = await ask(client, ["pinned"])
            return answer
        finally:
            await client.close()

    answer = asyncio.run(main())
    spent = settled(cluster, 1)
    assert [-e.amount for e in spent] == [
        pricing.price(answer.usage["promptTokens"], answer.usage["completionTokens"], "0.15")
    ]
    assert spent[0].amount == -price(answer)  # 0.15 and echo's 0.2 are one factor

    (cluster.dir / "pinned-7b").mkdir()
    other = Cluster(cluster.dir / "pinned-7b")
    try:
        other.market("--v3-room", ROOM, "--model-params", "echo=7")
        worker = other.worker("--room", ROOM, name="w9", data=True)
        wait_until(lambda: worker.poll() is not None or None, 30, worker.log)
        assert worker.returncode not in (0, None), worker.log()
        assert "model echo is priced here as 7 billion parameters (factor 70)" in worker.log()
        assert "Traceback" not in worker.log()
        assert other.agents("worker") == []
    finally:
        other.stop()
