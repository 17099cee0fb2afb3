"""Issue 15's attacker suite, step 3 (docs/protocol-v3.md §12): a rogue agent (the raw
peer of tests/v3_peers.py, with an identity of its own) attacks a v3 room while an
honest broker, two echo workers and two askers serve tasks. Each test asserts the
market's answer to the attack and that every honest task ended done with the right
answer."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from pycrdt import Array, Doc, Map

from igora import Client
from igora.testing import Cluster, wait_for
from igora.v3 import wire
from igora.v3.crypto import (
    AnswerError,
    AnswerReader,
    GrantError,
    PromptError,
    asker_answer_key,
    new_task_key,
    open_grant,
    open_prompt,
)
from igora.v3.tasks import (
    CHUNKS,
    CIPHERTEXT,
    GRANTS,
    PROMPT,
    RUN,
    TASKS,
    RunField,
    asker_doc,
    inbox,
    prompt_doc,
    run_doc,
)
from tests.test_v3_roles import ROOM, connected, v3_room, words
from tests.v3_peers import RawPeer, new_identity, update_setting

SLOW = ("--delay", "0.02")  # echo: seconds per word, so that tasks are live during attacks

Attack = Callable[[Cluster, Client, Client, str], Awaitable[None]]


def under_attack(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, attack: Attack, started: bool = False
) -> None:
    """Serve honest tasks from two askers; run ``attack(cluster, alice, bob, tid)`` with
    ``tid`` a task of alice's running meanwhile; every honest task must end done with the
    right answer. ``started``: the room and its roles run already (tests/test_v3_replicas.py
    starts them on three replicas), else one market is started with them."""
    if not started:
        v3_room(cluster, *SLOW)

    async def main() -> None:
        a, b = await connected(cluster, monkeypatch)
        try:
            target = words(60, "t")
            task = await a.submit(target)
            prompts = [(c, words(10, f"{c.name}{i}-")) for i in range(3) for c in (a, b)]
            honest = asyncio.gather(*(c.chat(p, max_tokens=40) for c, p in prompts))
            await attack(cluster, a, b, task.id)
            answer = await task.result()
            assert answer.text == f"Echo: {target}"
            assert await honest == [f"Echo: {p}" for _, p in prompts]
            assert await a.chat("after", max_tokens=10) == "Echo: after"
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


_rogues = itertools.count()


async def rogue(cluster: Cluster) -> RawPeer:
    """A rogue with a new identity; with replicas, on each of them in turn."""
    urls = cluster.url.split(",")
    return await RawPeer.join(urls[next(_rogues) % len(urls)], ROOM, new_identity())


async def overwrite_delete_or_abort(cluster: Cluster, a: Client, b: Client, tid: str) -> None:
    mine = Doc()
    attempts = [
        # overwrite the header with one asking for something else
        (asker_doc(a.id), update_setting(mine, TASKS, tid, {"id": tid, "model": "x"})),
        # replace the prompt
        (prompt_doc(a.id, tid), update_setting(Doc(), PROMPT, CIPHERTEXT, b"evil")),
        # abort it as the asker would
        (prompt_doc(a.id, tid), update_setting(Doc(), PROMPT, "abort", True)),
    ]
    for name, update in attempts:
        peer = await rogue(cluster)
        await peer.send(wire.Doc(name, wire.Sync.UPDATE, update))
        assert await peer.closed() == (4403, f"write to a document you do not own: {name}")
    # delete it: drop the prompt document
    peer = await rogue(cluster)
    name = prompt_doc(a.id, tid)
    await peer.send(wire.Control({"op": "drop", "doc": name}))
    assert await peer.closed() == (4403, f"drop of a document you do not own: {name}")


def test_overwrite_delete_or_abort_another_asker_task(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    under_attack(cluster, monkeypatch, overwrite_delete_or_abort)


def test_write_a_run_for_a_task_not_given(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def attack(cluster: Cluster, a: Client, b: Client, tid: str) -> None:
        peer = await rogue(cluster)
        me = peer.response.ids[0] if peer.response else ""
        # Its own run document for alice's task: taken, and read by nobody.
        forged = Doc()
        forged.get(CHUNKS, type=Array).append("forged answer")
        forged.get(RUN, type=Map).update({"state": "done", "finishReason": "stop"})
        own = run_doc(me, tid, 1)
        await peer.send(wire.Doc(own, wire.Sync.UPDATE, forged.get_update()))
        await peer.barrier()
        # Another worker's run document: closed.
        worker = await wait_for(lambda: a.worker_of(tid), 10, "alice's task assigned", cluster)
        theirs = run_doc(worker, tid, 1)
        await peer.send(wire.Doc(theirs, wire.Sync.UPDATE, forged.get_update()))
        assert await peer.closed() == (4403, f"write to a document you do not own: {theirs}")

    under_attack(cluster, monkeypatch, attack)


async def take_over_the_broker_role(cluster: Cluster, a: Client, b: Client, tid: str) -> None:
    # The lease while the honest broker holds it: refused, in line.
    peer = await rogue(cluster)
    await peer.send(wire.Control({"op": "lease"}))
    notice = await peer.notice("")
    assert notice.code == wire.Code.LEASE_HELD and "lease held" in notice.text
    # An inbox entry without the lease (a status ending alice's task): closed.
    name = inbox(a.id)
    update = update_setting(Doc(), TASKS, tid, {"state": "failed", "error": "forged"})
    await peer.send(wire.Doc(name, wire.Sync.UPDATE, update))
    assert await peer.closed() == (4403, f"write to a document you do not own: {name}")


def test_take_over_the_broker_role(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    under_attack(cluster, monkeypatch, take_over_the_broker_role)


def test_announce_another_agent_id(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """No frame carries a claimed id: a PRESENCE naming a worker's id changes nothing of
    that worker in who, and an advert in its name is closed."""

    async def attack(cluster: Cluster, a: Client, b: Client, tid: str) -> None:
        worker = await wait_for(lambda: a.worker_of(tid), 10, "alice's task assigned", cluster)

        def who() -> dict[str, dict[str, object]]:
            room = next(r for r in cluster.status()["rooms"] if r["name"] == ROOM)
            return {agent["id"]: agent for agent in room["agents"]}

        before = who()[worker]
        peer = await rogue(cluster)
        me = peer.response.ids[0] if peer.response else ""
        state = {"id": worker, "type": "worker", "name": "impostor"}
        await peer.send(wire.Presence({"state": state, "heartbeat": 5}))
        await peer.barrier()
        await wait_for(lambda: who().get(me, {}).get("name") == "impostor", 5, "the rogue in who")
        assert who()[worker] == before  # the worker's entry is its own
        await peer.send(wire.Control({"op": "advert", "id": worker, "name": "x"}))
        code, reason = await peer.closed()
        assert code == 4403 and worker[:20] in reason

    under_attack(cluster, monkeypatch, attack)


def stored(cluster: Cluster, name: str) -> Doc[Any] | None:
    """Document ``name`` of ROOM as the market's store holds it (what an operator, or
    anyone with the file, reads), or None if no row holds it yet."""
    db = sqlite3.connect(f"file:{cluster.data / 'market.sqlite3'}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT data FROM doc_updates WHERE room = ? AND doc = ?", (ROOM, name)
        ).fetchall()
    finally:
        db.close()
    if not rows:
        return None
    doc: Doc[Any] = Doc()
    for (data,) in rows:
        doc.apply_update(bytes(data))
    return doc


async def read_another_prompt_or_answer(cluster: Cluster, a: Client, b: Client, tid: str) -> None:
    worker = await wait_for(lambda: a.worker_of(tid), 10, "alice's task assigned", cluster)
    peer = await rogue(cluster)
    for name in (prompt_doc(a.id, tid), run_doc(worker, tid, 1)):
        await peer.send(wire.Subscribe(((name, False),)))
        assert (await peer.notice(name)).code == wire.Code.REFUSED
    # by prefix: refused too, and nothing of alice's comes
    await peer.send(wire.Subscribe(((f"p/{a.id}/", True),)))
    assert (await peer.notice(f"p/{a.id}/")).code == wire.Code.REFUSED

    def with_chunks() -> tuple[Doc[Any], Doc[Any]] | None:
        prompt, run = (
            stored(cluster, prompt_doc(a.id, tid)),
            stored(cluster, run_doc(worker, tid, 1)),
        )
        if prompt is None or run is None or len(run.get(CHUNKS, type=Array)) < 2:
            return None
        return prompt, run

    prompt, run = await wait_for(with_chunks, 10, "alice's task stored with chunks", cluster)
    fields = prompt.get(PROMPT, type=Map)
    ct, grants = bytes(fields[CIPHERTEXT]), fields[GRANTS]
    header = dict(a.v3._tracks[tid].header)  # type: ignore[union-attr]
    assert worker in grants  # the worker running it was granted the key
    mine = new_identity()
    session = mine.session_key()
    assert mine.id not in grants
    for grant in grants.values():
        with pytest.raises(GrantError, match="does not open with our session key"):
            open_grant(session, bytes(grant), header)
    with pytest.raises(PromptError, match="does not open"):
        open_prompt(new_task_key(), tid, a.id, ct)
    salt = bytes(run.get(RUN, type=Map)[RunField.SALT])
    key = asker_answer_key(new_task_key(), session, session.public_key, 1, salt)
    reader = AnswerReader(key, tid, 1)
    with pytest.raises(AnswerError, match="does not open"):
        reader.feed(bytes(run.get(CHUNKS, type=Array)[0]))


def test_read_another_prompt_or_answer(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """Subscribing to another's prompt or run is refused; the ciphertext itself (as the
    store holds it, which is also what an attached worker receives) opens for no one
    without a grant: not the grants made to others, not a guessed task key, not the
    answer under a key of the rogue's own."""
    under_attack(cluster, monkeypatch, read_another_prompt_or_answer)


MARKER = "zq-marker-5e1f"


def test_marker_string_absent_from_store_and_status(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tasks whose prompt and answer (echo) carry a marker string: while they run and
    after, the market's store file and its WAL, its archive endpoint and /status hold no
    plaintext marker, and the askers get their answers with it."""
    v3_room(cluster, *SLOW)
    files = [cluster.data / "market.sqlite3", cluster.data / "market.sqlite3-wal"]

    def operator_view(tid: str) -> bytes:
        seen = b"".join(f.read_bytes() for f in files if f.exists())
        seen += urllib.request.urlopen(f"http://127.0.0.1:{cluster.port}/status", timeout=10).read()
        try:
            urllib.request.urlopen(
                f"http://127.0.0.1:{cluster.port}/rooms/{ROOM}/tasks/{tid}", timeout=10
            )
        except urllib.error.HTTPError as exc:
            seen += exc.read()
        return seen

    async def main() -> None:
        a, b = await connected(cluster, monkeypatch)
        try:
            text = f"{words(40, 'w')} {MARKER}"
            task = await a.submit(text)
            worker = await wait_for(lambda: a.worker_of(task.id), 10, "task assigned", cluster)
            await wait_for(
                lambda: (
                    (run := stored(cluster, run_doc(worker, task.id, 1))) is not None
                    and len(run.get(CHUNKS, type=Array)) > 1
                    and stored(cluster, prompt_doc(a.id, task.id)) is not None
                ),
                10,
                "the task's prompt and answer in the store",
                cluster,
            )
            assert MARKER.encode() not in operator_view(task.id)  # while it runs
            answer = await task.result()
            assert answer.text == f"Echo: {text}" and MARKER in answer.text
            prompts = [(c, f"{MARKER} {c.name}{i}") for i in range(3) for c in (a, b)]
            answers = await asyncio.gather(*(c.chat(p, max_tokens=20) for c, p in prompts))
            assert answers == [f"Echo: {p}" for _, p in prompts]
            await asyncio.sleep(0.2)  # the store's last writes (every 50 ms)
            assert MARKER.encode() not in operator_view(task.id)  # and after
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())
