"""Trusted workers (``--trust-worker``, docs/security.md §6): an asker seals its tasks'
prompts only to the workers it names, the broker gives those tasks to no other, and a
broker that does anyway (here a rogue one, run in this process) gets no grant from the
asker: the task fails ``untrusted_worker`` and the other worker never opens it."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI
from pycrdt import Map

from igora import Client, NoWorkerError
from igora.config import market_address
from igora.errors import TaskFailed
from igora.identity import load_identity
from igora.testing import Cluster, free_port, wait_for
from igora.v3 import broker as v3_broker
from igora.v3 import roles as v3_roles
from igora.v3.tasks import GRANTS, PROMPT, Header, prompt_doc
from igora.v3.trust import MAX_TRUSTED, TrustError, trust_list, unavailable
from tests.test_attacks import stored
from tests.test_v3_roles import ROOM, SLOW, asker, v3_room, words


def worker_id(cluster: Cluster, name: str) -> str:
    """The id of the worker ``name`` started with ``data=True`` (its data folder's key,
    made now if the worker has not started yet)."""
    identity, _ = load_identity(Path(cluster.agent_data(name)["IGORA_DATA"]))
    return identity.id


def trusting(cluster: Cluster, monkeypatch: pytest.MonkeyPatch, trusted: str) -> Client:
    """Alice (her own identity), trusting worker ``trusted`` alone."""
    monkeypatch.setenv("IGORA_DATA", cluster.agent_data("alice")["IGORA_DATA"])
    return Client(cluster.url, ROOM, name="alice", timeout=60, trust_workers=[trusted])


def started(proc: Any, tid: str) -> bool:
    return f"task {tid} started" in proc.log()


def grants(cluster: Cluster, asker: str, tid: str) -> set[str] | None:
    """The workers granted task ``tid``'s key in the market's stored copy of its prompt
    document (None until it is stored)."""
    prompt = stored(cluster, prompt_doc(asker, tid))
    return None if prompt is None else set(prompt.get(PROMPT, type=Map)[GRANTS].keys())


def test_tasks_go_only_to_the_trusted_worker_even_when_it_is_full(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight slow tasks for one trusted worker of one slot, another worker idle: all
    eight run on the trusted one, their grants are to it alone, and their headers list
    it with ``candidatesOnly``; an asker without a trust list still uses both."""
    _, (w1, w2) = v3_room(cluster, *SLOW)
    trusted = worker_id(cluster, "w1")

    async def main() -> None:
        a = trusting(cluster, monkeypatch, trusted)
        await a.connect()
        try:
            assert a.v3 is not None
            await wait_for(lambda: a.workers(), 10, "the trusted worker in dir", cluster)
            assert [w.id for w in a.workers()] == [trusted]  # w2 is not shown
            prompts = [words(8, f"t{i}-") for i in range(8)]
            tasks = [await a.submit(p) for p in prompts]
            for task in tasks:
                track = a.v3._tracks[task.id]
                assert track.header[Header.CANDIDATES] == [trusted]
                assert track.header[Header.CANDIDATES_ONLY] is True
                assert set(track.granted) <= {trusted}
            for task in tasks:  # as the market stores them: no grant for w2
                granted = await wait_for(
                    lambda t=task: grants(cluster, a.id, t.id), 10, "prompt stored", cluster
                )
                assert granted <= {trusted}
            answers = [(await t.result()).text for t in tasks]
            assert answers == [f"Echo: {p}" for p in prompts]
            assert all(started(w1, t.id) for t in tasks)
            assert not any(started(w2, t.id) for t in tasks)
        finally:
            await a.close()
        b = asker(cluster, "bob", monkeypatch)  # no trust list: both workers
        await b.connect()
        try:
            free = [await b.submit(words(20, f"f{i}-")) for i in range(8)]
            for task in free:
                await task.result()
            assert any(started(w2, t.id) for t in free)
        finally:
            await b.close()

    asyncio.run(main())


def test_no_trusted_worker_present_is_a_clear_error_until_one_comes(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only an untrusted worker on the market: the task is refused at once with a
    sentence naming the trust list (no task put); once the trusted worker joins, the
    same client's task is answered by it."""
    cluster.market("--v3-room", ROOM)
    cluster.broker("--room", ROOM, name="b1", data=True)
    other = cluster.worker("--room", ROOM, name="w2", data=True)
    cluster.wait_agents("worker", 1)
    cluster.wait_agents("broker", 1)
    trusted = worker_id(cluster, "w1")

    async def main() -> None:
        a = trusting(cluster, monkeypatch, trusted)
        await a.connect()
        try:
            with pytest.raises(NoWorkerError) as err:
                await a.submit("anyone?", wait_worker=0.5)
            assert str(err.value) == (
                "the trusted worker (--trust-worker) is not on the market now"
            )
            w1 = cluster.worker("--room", ROOM, name="w1", data=True)
            task = await a.submit("you, trusted", wait_worker=20)
            assert (await task.result()).text == "Echo: you, trusted"
            assert started(w1, task.id) and not started(other, task.id)
        finally:
            await a.close()

    asyncio.run(main())


GRANT_WAIT_MARGIN = 1.0  # seconds: a run the worker could open would have started by then


class _Ignoring(Header):
    """The header fields as a broker that ignores the asker's candidates reads them."""

    CANDIDATES = "not-read"
    CANDIDATES_ONLY = "not-read-either"


def test_a_broker_that_assigns_an_untrusted_worker_gets_no_grant(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rogue broker (the v3 broker, in this process, reading no candidates and picking
    the untrusted worker whenever it can) holds the lease. The asker seals no grant to
    that worker: the task fails ``untrusted_worker`` with a sentence naming it, the
    worker never starts it, and the prompt document the asker wrote (and the market
    relayed to that worker, attached by the rogue) holds no grant for it."""
    cluster.market("--v3-room", ROOM)
    w1 = cluster.worker("--room", ROOM, name="w1", data=True)
    w2 = cluster.worker("--room", ROOM, name="w2", data=True)
    cluster.wait_agents("worker", 2)
    trusted, untrusted = worker_id(cluster, "w1"), worker_id(cluster, "w2")
    pick = v3_broker.pick_for

    def rogue_pick(kind: Any, workers: list[Any], load: dict[str, int]) -> Any:
        return pick(kind, [w for w in workers if w.id == untrusted] or workers, load)

    monkeypatch.setattr(v3_broker, "Header", _Ignoring)
    monkeypatch.setattr(v3_broker, "pick_for", rogue_pick)

    async def main() -> None:
        monkeypatch.setenv("IGORA_DATA", cluster.agent_data("rogue")["IGORA_DATA"])
        rogue = asyncio.create_task(
            v3_roles.run_broker(market_address(cluster.url, ROOM), name="rogue", heartbeat=1)
        )
        await asyncio.to_thread(cluster.wait_agents, "broker", 1)
        a = trusting(cluster, monkeypatch, trusted)
        await a.connect()
        try:
            task = await a.submit("for trusted eyes only")
            assert a.v3 is not None
            track, prompt = a.v3._tracks[task.id], a.v3.session.docs[prompt_doc(a.id, task.id)]
            with pytest.raises(TaskFailed) as err:
                await task.result()
            assert err.value.code == "untrusted_worker"
            assert f"assigned it to worker {untrusted}" in str(err.value)
            assert track.worker == untrusted  # the rogue's choice reached the asker
            assert untrusted not in track.granted
            assert untrusted not in prompt.get(PROMPT, type=Map)[GRANTS]
            await asyncio.sleep(GRANT_WAIT_MARGIN)  # what the worker would do, it did by now
            assert not started(w2, task.id) and not started(w1, task.id)
        finally:
            await a.close()
            rogue.cancel()
            await asyncio.gather(rogue, return_exceptions=True)

    asyncio.run(main())


def igora(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "igora", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_chat_with_a_trust_list_and_its_errors(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``igora chat --trust-worker``: an id, or a file of ids, is answered by that worker;
    a bad id, an unreadable file, or a protocol 2 room (for ``igora gateway`` too) is one
    line and exit status 2."""
    _, (w1, w2) = v3_room(cluster)
    trusted = worker_id(cluster, "w2")
    ids = tmp_path / "trusted.txt"
    ids.write_text(f"# the workers I run\n{trusted}  # w2\n\n")
    for entry in (trusted, f"@{ids}"):
        run = igora(
            "chat", "only w2", "--trust-worker", entry, "--market", cluster.url, "--room", ROOM
        )
        assert run.returncode == 0, run.stderr
        assert run.stdout == "Echo: only w2\n"
    ran = re.compile(r"task \S+ started")
    assert len(ran.findall(w2.log())) == 2 and not ran.findall(w1.log())

    bad = igora("chat", "x", "--trust-worker", "not-an-id", "--market", cluster.url)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "--trust-worker: agent id 'not-an-id' is not 43 characters" in bad.stderr
    missing = igora(
        "chat", "x", "--trust-worker", f"@{tmp_path / 'none.txt'}", "--market", cluster.url
    )
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "cannot read the trust list" in missing.stderr
    v2 = igora("chat", "x", "--trust-worker", trusted, "--market", cluster.url, "--room", "market")
    assert v2.returncode == 2 and "Traceback" not in v2.stderr
    assert "speaks protocol 2" in v2.stderr and "need a protocol 3 room" in v2.stderr
    port = str(free_port())
    gateway = igora("gateway", "--trust-worker", trusted, "--market", cluster.url, "--port", port)
    assert gateway.returncode == 2 and "Traceback" not in gateway.stderr
    assert "speaks protocol 2" in gateway.stderr and "need a protocol 3 room" in gateway.stderr


def test_a_gateway_with_a_trust_list_serves_the_openai_sdk_through_that_worker(
    cluster: Cluster,
) -> None:
    """``igora gateway --trust-worker``: the OpenAI SDK's requests, plain and streamed, all
    run on the trusted worker; with only untrusted workers a request is a 503 whose
    message names the trust list, not a wait until the deadline."""
    _, (w1, w2) = v3_room(cluster)
    trusted = worker_id(cluster, "w2")
    _, base = cluster.gateway("--room", ROOM, "--trust-worker", trusted, data=True)
    sdk = OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=30)
    for i in range(4):
        reply = sdk.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": f"trusted {i}"}]
        )
        assert reply.choices[0].message.content == f"Echo: trusted {i}"
    stream = sdk.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "streamed"}], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == (
        "Echo: streamed"
    )
    ran = re.compile(r"task \S+ started")
    assert len(ran.findall(w2.log())) == 5 and not ran.findall(w1.log())

    nobody = worker_id(cluster, "absent")
    _, other = cluster.gateway(
        "--room", ROOM, "--trust-worker", nobody, "--wait-worker", "0.5", name="g2", data=True
    )
    sdk = OpenAI(base_url=f"{other}/v1", api_key="none", max_retries=0, timeout=30)
    with pytest.raises(openai.APIStatusError) as err:
        sdk.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 503
    assert "the trusted worker (--trust-worker) is not on the market now" in str(err.value)


def test_trust_list_checks_each_entry() -> None:
    one, two = ("A" * 43), ("B" * 42 + "A")
    assert trust_list([one, two, one]) == {one, two}
    with pytest.raises(TrustError, match="names no worker"):
        trust_list([])
    with pytest.raises(TrustError, match="'bad' is not a worker id"):
        trust_list([one, "bad"])
    many = [f"{i:042d}A" for i in range(MAX_TRUSTED + 1)]
    with pytest.raises(TrustError, match=f"names {MAX_TRUSTED + 1} workers; at most"):
        trust_list(many)


def _worker(id_: str, model: str) -> Any:
    return v3_broker.worker_peer({"id": id_, "models": [{"name": model}], "slots": 1})


def test_a_task_only_for_its_candidates_is_judged_by_the_candidates_present() -> None:
    """The broker's unservable check: a ``candidatesOnly`` task waits (None) while none
    of its candidates is present, whatever the others serve; once one is, it is judged
    by what the candidates serve, not the others."""
    trusted, other = "A" * 43, "B" * 42 + "A"
    header = {
        Header.MODEL: "m",
        Header.NEEDS: [],
        Header.CANDIDATES: [trusted],
        Header.CANDIDATES_ONLY: True,
    }
    assert v3_broker._unservable(header, [_worker(other, "m")]) is None
    why = v3_broker._unservable(header, [_worker(other, "m"), _worker(trusted, "n")])
    assert why is not None and why.code.value == "model_not_served"
    assert v3_broker._unservable(header, [_worker(trusted, "m")]) is None
    open_header = {k: v for k, v in header.items() if k != Header.CANDIDATES_ONLY}
    assert v3_broker._unservable(open_header, [_worker(other, "m"), _worker(trusted, "n")]) is None


def test_the_sentence_when_no_trusted_worker_can_take_a_task() -> None:
    assert unavailable(1, "x", False) == (
        "the trusted worker (--trust-worker) is not on the market now"
    )
    assert unavailable(3, "x", False) == (
        "none of the 3 trusted workers (--trust-worker) is on the market now"
    )
    assert unavailable(1, "no model m", True) == (
        "the trusted worker (--trust-worker) cannot take it: no model m"
    )
    assert unavailable(2, "no model m", True) == (
        "none of the 2 trusted workers (--trust-worker) can take it: no model m"
    )
