"""The market's side of protocol 3 (docs/protocol-v3.md §3-§4, §10; security.md §3),
against a real ``igora market`` process and raw peers (tests/v3_peers.py) that speak the
frames without any rule of their own."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pycrdt import Doc, Map
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from igora.identity import Identity
from igora.market.run import _loopback
from igora.v3 import advert, wire
from igora.v3.handshake import Response

from .conftest import Cluster
from .market_peers import JS, ensure_node_modules
from .v3_peers import RawPeer, new_identity, update_setting

TID = "abcdefghijKLMN-_"
LONG = "SmolLM2-135M-Instruct.Q4_1"  # the bundled model: its refusal passes 123 bytes
ROOM = "market"


def secure(cluster: Cluster, *extra: str) -> str:
    """A ``--secure`` market admitting any identity (membership: test_v3_membership.py),
    its identity and store in the test's folder; its URL."""
    cluster.market("--secure", "--members", "open", *extra)
    return cluster.url


def doc_content(*updates: bytes, map_name: str = "m") -> dict[str, object]:
    doc: Doc[object] = Doc()
    for u in updates:
        doc.apply_update(u)
    return doc.get(map_name, type=Map).to_py() or {}


async def test_a_connection_that_proves_nothing_is_closed_4401(cluster: Cluster) -> None:
    url = secure(cluster)
    market_id = cluster.status()["market"]["id"]
    silent, early, text = [await RawPeer.open(url, ROOM) for _ in range(3)]
    assert silent.subprotocol == wire.SUBPROTOCOL
    challenge = await silent.read_challenge()
    assert challenge.market == market_id and challenge.room == ROOM
    await early.read_challenge()
    await early.send(wire.Subscribe((("dir", False),)))  # anything before the RESPONSE
    await text.read_challenge()
    await text.send_raw("hello")
    code, reason = await early.closed()
    assert (code, reason) == (4401, "handshake refused: Subscribe frame before the handshake")
    code, reason = await text.closed()
    assert code == 4401 and "text frame" in reason
    code, reason = await silent.closed(timeout=15)  # the market waits 5 s for a RESPONSE
    assert (code, reason) == (4401, "no RESPONSE within 5 s")
    assert "disconnected (4401), no RESPONSE within 5 s" in cluster.procs[0].log()


async def test_a_replayed_response_is_refused_and_a_fresh_one_welcomed(cluster: Cluster) -> None:
    url = secure(cluster)
    alice = new_identity()
    honest = await RawPeer.join(url, ROOM, alice)
    assert honest.welcome is not None and honest.welcome.granted == [alice.id]
    assert honest.challenge is not None and honest.response is not None
    # The welcome is signed by the key /status shows.
    market_id = cluster.status()["market"]["id"]
    assert honest.challenge.market == market_id
    recorded = honest.response

    thief = await RawPeer.open(url, ROOM)
    fresh = await thief.read_challenge()
    assert fresh.nonce != honest.challenge.nonce
    await thief.send(recorded.frame())
    code, reason = await thief.closed()
    assert code == 4401 and reason.startswith("handshake refused:")

    # Signing someone else's id without its key proves nothing either.
    forger = await RawPeer.open(url, ROOM)
    challenge = await forger.read_challenge()
    mine = Response.make(challenge, [new_identity()])
    await forger.send(wire.Auth(wire.AuthType.RESPONSE, {**mine.frame().body, "ids": [alice.id]}))  # type: ignore[dict-item]
    code, _ = await forger.closed()
    assert code == 4401
    # The honest connection is untouched.
    await honest.send(wire.Subscribe(((f"in/{alice.id}", False),)))
    await honest.barrier()
    assert honest.received == []  # no notice: its own inbox may be read


async def test_a_write_to_a_document_one_does_not_own_is_closed_4403(cluster: Cluster) -> None:
    url = secure(cluster)
    alice, bob = new_identity(), new_identity()
    reader = await RawPeer.join(url, ROOM, bob)
    await reader.send(wire.Subscribe(((f"a/{bob.id}", False),)))
    rogue = await RawPeer.join(url, ROOM, alice)
    forged = update_setting(Doc(), "tasks", TID, {"asker": bob.id, "model": "x"})
    name = f"a/{bob.id}"
    await rogue.send(wire.Doc(name, wire.Sync.UPDATE, forged))
    code, reason = await rogue.closed()
    assert (code, reason) == (4403, f"write to a document you do not own: {name}"[:123])
    # In a batch, after an allowed write, and to the market's own documents: the same.
    for target in ("dir", "who", f"in/{alice.id}", "board", f"r/{bob.id}/{TID}.1"):
        rogue = await RawPeer.join(url, ROOM, alice)
        own = update_setting(Doc(), "tasks", TID, {"asker": alice.id})
        await rogue.send(
            wire.Doc(f"a/{alice.id}", wire.Sync.UPDATE, own),
            wire.Doc(target, wire.Sync.STEP2, forged),
        )
        code, reason = await rogue.closed()
        assert code == 4403 and reason.endswith(target), (target, reason)
    # Nothing of it reached bob's readers, nor the market's copy.
    await reader.send(wire.Doc(name, wire.Sync.STEP1, b"\x00"))
    answer = await reader.doc(name, wire.Sync.STEP2)
    assert answer.payload == b"\x00\x00"
    own_step1 = await reader.doc(name, wire.Sync.STEP1)  # bob owns it: its re-sync
    assert own_step1.payload == b"\x00"
    assert not [f for f in reader.received if isinstance(f, wire.Doc)]


async def test_a_subscription_to_another_inbox_is_refused_with_a_notice(cluster: Cluster) -> None:
    url = secure(cluster)
    alice, bob = new_identity(), new_identity()
    peer = await RawPeer.join(url, ROOM, alice)
    await peer.send(
        wire.Subscribe(
            (
                (f"in/{bob.id}", False),
                (f"p/{bob.id}/{TID}", False),
                ("who", False),
                ("in/", True),
                ("nonsense", False),
            )
        )
    )
    for doc in (f"in/{bob.id}", f"p/{bob.id}/{TID}", "who", "in/", "nonsense"):
        notice = await peer.notice(doc)
        assert notice.code == wire.Code.REFUSED, notice
    # Still connected: its own inbox and dir are fine (no notice, nothing to send yet).
    await peer.send(wire.Subscribe(((f"in/{alice.id}", False), ("dir", False))))
    await peer.send(wire.Doc(f"in/{alice.id}", wire.Sync.STEP1, b"\x00"))
    answer = await peer.doc(f"in/{alice.id}", wire.Sync.STEP2)
    assert answer.payload == b"\x00\x00"
    # A step 1 for a document it does not read: a notice, and still no content.
    await peer.send(wire.Doc(f"a/{bob.id}", wire.Sync.STEP1, b"\x00"))
    assert (await peer.notice(f"a/{bob.id}")).code == wire.Code.REFUSED


async def test_an_owner_writes_and_its_other_connection_reads(cluster: Cluster) -> None:
    url = secure(cluster)
    alice, bob = new_identity(), new_identity()
    name = f"p/{alice.id}/{TID}"
    writer = await RawPeer.join(url, ROOM, alice)
    early = await RawPeer.join(url, ROOM, alice)  # same identity, another socket
    await early.send(wire.Subscribe(((name, False),)))
    await asyncio.sleep(0.2)  # the subscription is taken before the write below
    doc: Doc[object] = Doc()
    first = update_setting(doc, "m", "pt", "What is the capital of France?")
    await writer.send(wire.Doc(name, wire.Sync.UPDATE, first))
    got = await early.doc(name, wire.Sync.UPDATE)
    assert doc_content(got.payload) == {"pt": "What is the capital of France?"}
    # A subscriber that comes later gets the state at once (step 2), then the updates.
    late = await RawPeer.join(url, ROOM, alice)
    await late.send(wire.Subscribe(((name, False),)))
    state = await late.doc(name, wire.Sync.STEP2)
    assert doc_content(state.payload) == {"pt": "What is the capital of France?"}
    # Many updates in one batch reach the readers (merged or not) in order; the writer
    # gets no echo; another identity that subscribes is refused.
    updates = [update_setting(doc, "m", f"k{i}", i) for i in range(100)]
    await writer.send(*(wire.Doc(name, wire.Sync.UPDATE, u) for u in updates))
    expected = doc_content(first, *updates)
    for reader in (early, late):
        payloads = [got.payload]
        while doc_content(*payloads) != expected:
            payloads.append((await reader.doc(name, wire.Sync.UPDATE)).payload)
    stranger = await RawPeer.join(url, ROOM, bob)
    await stranger.send(wire.Subscribe(((name, False),)))
    assert (await stranger.notice(name)).code == wire.Code.REFUSED
    await writer.barrier()
    assert not [f for f in writer.received if isinstance(f, wire.Doc)], writer.received
    room = next(r for r in cluster.status()["rooms"] if r["name"] == ROOM)
    assert room["protocol"] == 3 and room["identities"] == 2 and room["documents"] == 1


async def test_an_owner_resyncs_its_document_after_a_reconnection(cluster: Cluster) -> None:
    """Step 1 from the owner: the market's diff, then the market's own step 1, which the
    owner answers with what the market lacks (written while it was away)."""
    url = secure(cluster)
    alice = new_identity()
    name = f"w/{alice.id}"
    doc: Doc[object] = Doc()
    reader = await RawPeer.join(url, ROOM, alice)
    await reader.send(wire.Subscribe(((name, False),)))
    first = await RawPeer.join(url, ROOM, alice)
    await first.send(wire.Doc(name, wire.Sync.UPDATE, update_setting(doc, "runs", "a", 1)))
    await reader.doc(name, wire.Sync.UPDATE)
    await first.close()
    offline = update_setting(doc, "runs", "b", 2)  # written while disconnected
    assert offline
    again = await RawPeer.join(url, ROOM, alice)
    await again.send(wire.Doc(name, wire.Sync.STEP1, doc.get_state()))
    step2 = await again.doc(name, wire.Sync.STEP2)
    doc.apply_update(step2.payload)  # nothing new for the owner
    assert doc_content(doc.get_update(), map_name="runs") == {"a": 1, "b": 2}
    step1 = await again.doc(name, wire.Sync.STEP1)
    await again.send(wire.Doc(name, wire.Sync.STEP2, doc.get_update(step1.payload)))
    got = await reader.doc(name, wire.Sync.UPDATE)
    assert doc_content(got.payload, map_name="runs") == {"b": 2}
    # The market now holds both: a step 1 from scratch gets the whole document. (Every
    # reader of w/<id> in step 2 is its owner: brokers, the other readers, are step 3.)
    await reader.send(wire.Doc(name, wire.Sync.STEP1, b"\x00"))
    diff = await reader.doc(name, wire.Sync.STEP2)
    assert doc_content(diff.payload, map_name="runs") == {"a": 1, "b": 2}


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        ([wire.Doc("x/y", wire.Sync.UPDATE, b"\x00\x00")], "unknown document 'x/y'"),
        ([wire.Notice(200, "dir", "hi")], "Notice frames go from the market only"),
        ([wire.Auth(wire.AuthType.RESPONSE, {})], "AUTH frame after the handshake"),
    ],
)
async def test_a_frame_out_of_place_is_closed_4400(
    cluster: Cluster, frames: list[wire.Frame], reason: str
) -> None:
    url = secure(cluster)
    peer = await RawPeer.join(url, ROOM, new_identity())
    await peer.send(*frames)
    assert await peer.closed() == (4400, reason)


async def test_bad_bytes_and_bad_updates_are_closed_4400(cluster: Cluster) -> None:
    url = secure(cluster)
    alice = new_identity()
    peer = await RawPeer.join(url, ROOM, alice)
    await peer.send_raw(b"\x63\x01\x02")
    code, reason = await peer.closed()
    assert code == 4400 and reason.startswith("bad frame: unknown frame kind 99")
    peer = await RawPeer.join(url, ROOM, alice)
    await peer.send(wire.Doc(f"a/{alice.id}", wire.Sync.UPDATE, b"\x01\x05garbage"))
    code, reason = await peer.closed()
    assert code == 4400 and reason.startswith(f"refused update of a/{alice.id}")
    peer = await RawPeer.join(url, ROOM, alice)
    await peer.send(wire.Doc(f"a/{alice.id}", wire.Sync.STEP1, b"\x05\x01"))
    assert await peer.closed() == (4400, f"bad state vector for a/{alice.id}")


async def test_a_task_document_over_its_size_is_refused(cluster: Cluster) -> None:
    url = secure(cluster, "--max-message", "4096")
    alice = new_identity()
    peer = await RawPeer.join(url, ROOM, alice)
    assert peer.welcome is not None and peer.welcome.limits["taskDocumentBytes"] == 4096
    doc: Doc[object] = Doc()
    name = f"p/{alice.id}/{TID}"
    await peer.send(wire.Doc(name, wire.Sync.UPDATE, update_setting(doc, "m", "a", "x" * 3000)))
    await peer.send(wire.Doc(name, wire.Sync.UPDATE, update_setting(doc, "m", "b", "y" * 1500)))
    code, reason = await peer.closed()
    assert (code, reason) == (4400, f"refused update (over 4096 bytes): {name}")


async def test_a_restarted_market_serves_the_documents_again(cluster: Cluster) -> None:
    url = secure(cluster)
    market_id = cluster.status()["market"]["id"]
    alice = new_identity()
    doc: Doc[object] = Doc()
    writer = await RawPeer.join(url, ROOM, alice)
    names = [f"a/{alice.id}", f"p/{alice.id}/{TID}"]
    for i in range(150):  # past the 64-entry merge, so the store squashed rows too
        await writer.send(
            *(
                wire.Doc(n, wire.Sync.UPDATE, update_setting(doc, "m", f"k{i}", i))
                for n in names[:1]
            )
        )
    await writer.send(
        wire.Doc(names[1], wire.Sync.UPDATE, update_setting(Doc(), "m", "pt", "hello"))
    )
    await writer.barrier()  # the market took everything before it
    await writer.close()
    cluster.procs[0].stop()
    cluster.market("--secure", "--members", "open")
    assert cluster.status()["market"]["id"] == market_id  # same key file
    reader = await RawPeer.join(url, ROOM, alice)
    await reader.send(wire.Subscribe(tuple((n, False) for n in names)))
    a = await reader.doc(names[0], wire.Sync.STEP2)
    assert doc_content(a.payload) == {f"k{i}": i for i in range(150)}
    p = await reader.doc(names[1], wire.Sync.STEP2)
    assert doc_content(p.payload) == {"pt": "hello"}
    room = next(r for r in cluster.status()["rooms"] if r["name"] == ROOM)
    assert room["documents"] == 2  # the agent's (the market's dir and who are not counted)


async def test_an_open_market_serves_v3_only_in_the_rooms_named(cluster: Cluster) -> None:
    cluster.market("--v3-room", "private")
    status = cluster.status()
    assert status["market"]["v3Rooms"] == ["private"] and not status["market"]["secure"]
    assert len(status["market"]["id"]) == 43
    # A v3 agent in a v2 room: accepted without the subprotocol, served y-websocket.
    ws = await connect(f"{cluster.url}/market", subprotocols=[wire.SUBPROTOCOL])  # type: ignore[list-item]
    async with ws:
        assert ws.subprotocol is None
        await ws.send(b"\x00\x00\x01\x00")  # y-websocket sync step 1, empty state vector
        first = await asyncio.wait_for(ws.recv(), 10)
        assert isinstance(first, bytes) and first[0] == 0  # a sync message back
    peer = await RawPeer.join(cluster.url, "private", new_identity())
    assert peer.subprotocol == wire.SUBPROTOCOL
    rooms = {r["name"]: r["protocol"] for r in cluster.status()["rooms"]}
    assert rooms == {"market": 2, "private": 3}


async def test_a_plain_websocket_in_a_v3_room_is_told_why_and_closed_4426(cluster: Cluster) -> None:
    url = secure(cluster)
    ws = await connect(f"{url}/{ROOM}")
    async with ws:
        assert ws.subprotocol is None
        denied = wire.decode(await asyncio.wait_for(ws.recv(), 10))  # type: ignore[arg-type]
        assert isinstance(denied, wire.Auth) and denied.type is wire.AuthType.DENIED
        assert isinstance(denied.body, str) and "Igora protocol 3" in denied.body
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
    assert ws.close_code == 4426


def test_a_node_y_websocket_client_in_a_v3_room_gets_the_reason_and_4426(
    cluster: Cluster,
) -> None:
    if shutil.which("node") is None:
        pytest.fail("node is required (scripts/test-tools.sh)")
    ensure_node_modules()
    url = secure(cluster)
    run = subprocess.run(
        ["node", str(JS / "refused.mjs"), url, ROOM],
        capture_output=True,
        text=True,
        timeout=60,
    )
    events = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert run.returncode == 0, run.stdout + run.stderr
    denied = next(e for e in events if e["ev"] == "denied")
    assert "this room speaks Igora protocol 3 (identities, owned documents)" in denied["message"]
    assert "see docs/security.md" in denied["message"]
    close = next(e for e in events if e["ev"] == "close")
    assert close["code"] == 4426 and close["reason"] == "this room speaks Igora protocol 3"
    assert "speaks protocol 3" in cluster.procs[0].log()


def test_market_flags_are_checked_and_the_id_is_logged(cluster: Cluster, tmp_path: Path) -> None:
    cluster.market("--secure")
    status = cluster.status()
    log = cluster.procs[0].log()
    assert f"market identity {status['market']['id']}; protocol 3 in every room" in log
    assert (cluster.data / "identity.key").is_file()
    assert "plain ws://" not in log  # 127.0.0.1: no TLS warning
    assert _loopback("localhost") and _loopback("::1") and not _loopback("0.0.0.0")
    bad = subprocess.run(
        [sys.executable, "-m", "igora", "market", "--v3-room", "x" * 300],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--v3-room" in bad.stderr
    for flags, why in (
        (["--model-params", "echo"], "is not NAME=BILLIONS"),
        (["--model-params", "echo=0"], "positive number"),
        (["--model-params", "echo=1"], "only protocol 3 rooms keep"),
        (
            ["--v3-room", "x", "--model-params", "a=1", "--model-params", "a=2"],
            "pins a more than once",
        ),
        (
            ["--v3-room", "x", "--redis", "redis://127.0.0.1:9", "--model-params", "a=1"],
            "does not answer",  # pinned sizes are kept on replicas too: Redis is checked
        ),
    ):
        bad = subprocess.run(
            [sys.executable, "-m", "igora", "market", "--memory", *flags],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bad.returncode == 2 and why in bad.stderr, (flags, bad.stderr)
        assert "Traceback" not in bad.stderr


async def test_the_broker_lease_has_one_holder_and_moves_to_the_next_in_line(
    cluster: Cluster,
) -> None:
    b1, b2, asker = new_identity(), new_identity(), new_identity()
    url = secure(cluster, "--broker-key", b1.id, "--broker-key", b2.id)
    c = await RawPeer.join(url, ROOM, asker)
    inbox = f"in/{asker.id}"
    await c.send(wire.Subscribe(((inbox, False), ("who", False), ("a/", True))))
    assert (await c.notice("who")).code == wire.Code.REFUSED  # brokers only
    assert (await c.notice("a/")).code == wire.Code.REFUSED
    await c.send(wire.Control({"op": "lease"}))
    refused = await c.notice("")
    assert refused.code == wire.Code.REFUSED and "may not be a broker" in refused.text

    first = await RawPeer.join(url, ROOM, b1)
    await first.send(wire.Control({"op": "lease"}))
    granted = await first.notice("")
    assert (granted.code, granted.text) == (200, "lease granted, epoch 1")
    second = await RawPeer.join(url, ROOM, b2)
    await second.send(wire.Subscribe((("a/", True), ("who", False))), wire.Control({"op": "lease"}))
    held = await second.notice("")
    assert (held.code, held.text) == (409, "lease held, epoch 1; you are number 1 in line")

    doc: Doc[object] = Doc()
    await first.send(wire.Doc(inbox, wire.Sync.UPDATE, update_setting(doc, "tasks", TID, 1)))
    got = await c.doc(inbox, wire.Sync.UPDATE)
    assert doc_content(got.payload, map_name="tasks") == {TID: 1}
    # The asker writes its own a/ (read by the waiting broker, by prefix), not its inbox.
    await c.send(wire.Doc(f"a/{asker.id}", wire.Sync.UPDATE, update_setting(Doc(), "t", "x", 1)))
    await second.doc(f"a/{asker.id}", wire.Sync.UPDATE)
    await c.send(wire.Doc(inbox, wire.Sync.UPDATE, update_setting(Doc(), "tasks", "y", 2)))
    assert (await c.closed())[0] == 4403

    await first.close()  # the holder leaves: the next in line gets the next epoch
    moved = await second.notice("")
    assert (moved.code, moved.text) == (200, "lease granted, epoch 2")
    await second.send(wire.Doc("board", wire.Sync.UPDATE, update_setting(Doc(), "b", "n", 1)))
    await second.barrier()
    status = next(r for r in cluster.status()["rooms"] if r["name"] == ROOM)
    assert status["lease"] == {"epoch": 2, "held": True}
    # A broker that does not hold the lease writes in/ and board as anyone else: 4403.
    third = await RawPeer.join(url, ROOM, b1)
    await third.send(wire.Doc("board", wire.Sync.UPDATE, update_setting(Doc(), "b", "n", 2)))
    assert (await third.closed())[0] == 4403


async def test_the_lease_holder_attaches_task_documents_and_owners_drop_them(
    cluster: Cluster,
) -> None:
    cluster.market("--v3-room", ROOM)  # an open market: any identity may be a broker
    url = cluster.url
    broker, worker, asker = new_identity(), new_identity(), new_identity()
    prompt = f"p/{asker.id}/{TID}"
    c = await RawPeer.join(url, ROOM, asker)
    await c.send(wire.Doc(prompt, wire.Sync.UPDATE, update_setting(Doc(), "m", "pt", "hi")))
    w = await RawPeer.join(url, ROOM, worker)
    await w.send(wire.Subscribe(((prompt, False),)))
    assert (await w.notice(prompt)).code == wire.Code.REFUSED  # not attached yet
    b = await RawPeer.join(url, ROOM, broker)
    await b.send(wire.Control({"op": "attach", "to": worker.id, "docs": [prompt]}))
    refused = await b.notice("")
    assert refused.code == wire.Code.REFUSED and "lease holder" in refused.text
    await b.send(wire.Control({"op": "lease"}))
    assert (await b.notice("")).code == wire.Code.LEASE_GRANTED
    inbox = f"in/{worker.id}"
    await w.send(wire.Subscribe(((inbox, False),)))
    await w.barrier()
    await b.send(
        wire.Doc(inbox, wire.Sync.UPDATE, update_setting(Doc(), "tasks", TID, {"n": 1})),
        wire.Control({"op": "attach", "to": worker.id, "docs": [prompt]}),
    )
    # The assignment, then the prompt's state, in that order.
    first = await w.until(lambda f: isinstance(f, wire.Doc), what="a DOC")
    assert isinstance(first, wire.Doc) and first.name == inbox
    state = await w.doc(prompt, wire.Sync.STEP2)
    assert doc_content(state.payload) == {"pt": "hi"}
    # The attachment belongs to the identity: a new connection of the worker reads it.
    w2 = await RawPeer.join(url, ROOM, worker)
    assert doc_content((await w2.doc(prompt, wire.Sync.STEP2)).payload) == {"pt": "hi"}
    await c.send(wire.Doc(prompt, wire.Sync.UPDATE, update_setting(Doc(), "m", "abort", True)))
    for peer in (w, w2):
        assert doc_content((await peer.doc(prompt, wire.Sync.UPDATE)).payload) == {"abort": True}
    # Attaching a document that is not a task's is refused: a protocol error.
    await b.send(wire.Control({"op": "attach", "to": worker.id, "docs": [f"a/{asker.id}"]}))
    assert (await b.closed())[0] == 4400
    # Dropping another's document is a write to it; the owner's drop ends it for readers.
    await w2.send(wire.Control({"op": "drop", "doc": prompt}))
    assert (await w2.closed()) == (4403, f"drop of a document you do not own: {prompt}")
    await c.send(wire.Control({"op": "drop", "doc": prompt}))
    dropped = await w.notice(prompt)
    assert dropped.code == wire.Code.DROPPED
    await c.send(wire.Subscribe(((prompt, False),)))
    await c.barrier()
    assert not [f for f in c.received if isinstance(f, wire.Doc)]  # nothing left to send
    room = next(r for r in cluster.status()["rooms"] if r["name"] == ROOM)
    assert room["documents"] == 1  # in/<worker>


async def test_a_connection_silent_for_three_heartbeats_is_closed(cluster: Cluster) -> None:
    url = secure(cluster)
    quiet = await RawPeer.join(url, ROOM, new_identity())
    await quiet.send(wire.Presence({"state": {"type": "worker"}, "heartbeat": 0.5}))
    alive = await RawPeer.join(url, ROOM, new_identity())
    await alive.send(wire.Presence({"heartbeat": 0.5}))
    loop = asyncio.get_running_loop()
    start = loop.time()
    closing = asyncio.create_task(quiet.closed(timeout=10))
    while not closing.done():
        await alive.send(wire.Presence({}))
        await asyncio.sleep(0.3)
    assert closing.result() == (4408, "nothing received for 1.5 s")
    assert loop.time() - start >= 1.0
    await alive.barrier()  # still open
    bad = await RawPeer.join(url, ROOM, new_identity())
    await bad.send(wire.Presence({"heartbeat": "often"}))
    assert await bad.closed() == (4400, "a PRESENCE heartbeat is 0.1 to 300 s")


async def test_the_market_writes_dir_and_who(cluster: Cluster) -> None:
    """who: every identity connected, with the type and name of its PRESENCE; dir: the
    market's key and limits, and the lease holder. Both survive a restart as documents,
    emptied of who was there."""
    cluster.market("--v3-room", ROOM)
    market_id = cluster.status()["market"]["id"]
    broker, worker = new_identity(), new_identity()
    b = await RawPeer.join(cluster.url, ROOM, broker)
    await b.send(wire.Subscribe((("who", False), ("dir", False))))
    who: Doc[object] = Doc()
    directory: Doc[object] = Doc()
    feeds = {"who": who, "dir": directory}

    async def until_seen(check: Callable[[], bool], what: str) -> None:
        for _ in range(100):
            if check():
                return
            frame = await b.until(lambda f: isinstance(f, wire.Doc) and f.name in feeds)
            assert isinstance(frame, wire.Doc)
            feeds[frame.name].apply_update(frame.payload)
        raise AssertionError(what)

    def agents() -> dict[str, object]:
        return who.get("agents", type=Map).to_py() or {}

    def lease() -> dict[str, object]:
        return directory.get("broker", type=Map).to_py() or {}

    await until_seen(lambda: broker.id in agents(), "the broker in who")
    info = directory.get("market", type=Map).to_py() or {}
    assert info["key"] == market_id and info["version"] == 3
    w = await RawPeer.join(cluster.url, ROOM, worker)
    await w.send(wire.Presence({"state": {"type": "worker", "name": "w1"}}))
    await until_seen(
        lambda: (agents().get(worker.id) or {}).get("name") == "w1",  # type: ignore[union-attr]
        "the worker's name in who",
    )
    entry = agents()[worker.id]
    assert isinstance(entry, dict) and entry["type"] == "worker" and entry["since"] > 0
    listed = next(r for r in cluster.status()["rooms"] if r["name"] == ROOM)["agents"]
    assert {a["id"]: a["name"] for a in listed} == {broker.id: None, worker.id: "w1"}
    await b.send(wire.Control({"op": "lease"}))
    await until_seen(lambda: lease() == {"id": broker.id, "epoch": 1}, "the lease in dir")
    await w.close()
    await until_seen(lambda: worker.id not in agents(), "the worker gone from who")
    # Nobody writes dir or who but the market, the lease holder included.
    await b.send(wire.Doc("who", wire.Sync.UPDATE, update_setting(Doc(), "agents", "x", 1)))
    assert (await b.closed())[0] == 4403

    cluster.procs[0].stop()
    cluster.market("--v3-room", ROOM)
    b = await RawPeer.join(cluster.url, ROOM, broker)
    await b.send(wire.Subscribe((("who", False), ("dir", False))))
    await until_seen(lambda: lease() == {"epoch": 1} and set(agents()) == {broker.id}, "fresh")
    # The epoch goes on from the stored one: agents never see an older one again.
    await b.send(wire.Control({"op": "lease"}))
    assert (await b.notice("")).text == "lease granted, epoch 2"
    await until_seen(lambda: lease() == {"id": broker.id, "epoch": 2}, "the lease in dir")


async def test_an_identity_owns_at_most_1000_live_task_documents(cluster: Cluster) -> None:
    url = secure(cluster)
    alice = new_identity()
    peer = await RawPeer.join(url, ROOM, alice)
    update = update_setting(Doc(), "m", "pt", "x")
    names = [f"p/{alice.id}/{i:016d}" for i in range(1001)]
    await peer.send(*(wire.Doc(n, wire.Sync.UPDATE, update) for n in names[:1000]))
    await peer.send(wire.Control({"op": "drop", "doc": names[0]}))  # one less
    await peer.send(wire.Doc(names[1000], wire.Sync.UPDATE, update))
    await peer.barrier()
    await peer.send(wire.Doc(f"r/{alice.id}/{TID}.1", wire.Sync.UPDATE, update))
    code, reason = await peer.closed()
    assert (code, reason) == (
        4400,
        f"refused update (over 1000 live task documents): r/{alice.id}/{TID}.1",
    )
    room = next(r for r in cluster.status()["rooms"] if r["name"] == ROOM)
    assert room["documents"] == 1000


async def test_a_worker_advert_is_checked_and_listed_in_dir_while_it_is_there(
    cluster: Cluster,
) -> None:
    cluster.market("--v3-room", ROOM)
    reader_id, worker, other = new_identity(), new_identity(), new_identity()
    reader = await RawPeer.join(cluster.url, ROOM, reader_id)
    await reader.send(wire.Subscribe((("dir", False),)))
    directory: Doc[object] = Doc()

    async def workers_until(check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        for _ in range(50):
            listed: dict[str, Any] = directory.get("workers", type=Map).to_py() or {}
            if check(listed):
                return listed
            directory.apply_update((await reader.doc("dir")).payload)
        raise AssertionError("dir.workers never matched")

    made = advert.make(
        worker,
        worker.session_key(),
        name="w1",
        engine="echo",
        models=[{"name": "echo"}],
        slots=2,
    )
    w = await RawPeer.join(cluster.url, ROOM, worker)
    await w.send(wire.Control({"op": "advert", **made}))
    listed = await workers_until(lambda ws: worker.id in ws)
    assert advert.check(listed[worker.id]) == made  # as the worker signed it
    # Changed after signing, or for an id this connection did not prove: refused.
    rogue = await RawPeer.join(cluster.url, ROOM, other)
    await rogue.send(wire.Control({"op": "advert", **made}))
    assert (await rogue.closed())[0] == 4403
    liar = await RawPeer.join(cluster.url, ROOM, worker)
    await liar.send(wire.Control({"op": "advert", **made, "slots": 64}))
    code, reason = await liar.closed()
    assert code == 4400 and "bad signature" in reason
    await w.close()
    await workers_until(lambda ws: worker.id not in ws)


async def test_the_documents_of_one_identity_hold_at_most_its_bytes(cluster: Cluster) -> None:
    """Rule 3 (protocol-v3.md §12.1): all the documents one identity owns, its long-lived
    ``a/`` included, hold at most --max-identity-bytes; a drop frees its share, and
    another identity is not held back by the first one's bytes."""
    url = secure(cluster, "--max-message", "300000", "--max-identity-bytes", "1000000")
    alice, bob = new_identity(), new_identity()
    peer = await RawPeer.join(url, ROOM, alice)
    assert peer.welcome is not None and peer.welcome.limits["identityBytes"] == 1_000_000

    def blob(tag: str) -> bytes:  # a task document of ~250 KB
        return update_setting(Doc(), "m", "pt", tag * 250_000)

    names = [f"p/{alice.id}/{i:016d}" for i in range(4)]
    for n in names[:3]:  # one message each: a message holds at most --max-message
        await peer.send(wire.Doc(n, wire.Sync.UPDATE, blob("x")))
    await peer.send(wire.Control({"op": "drop", "doc": names[0]}))  # its bytes are freed
    await peer.send(wire.Doc(names[3], wire.Sync.UPDATE, blob("y")))  # 750 KB again
    await peer.barrier()
    # The long-lived asker document had no bound: it grows until the identity's is reached.
    mine: Doc[object] = Doc()
    name = f"a/{alice.id}"
    for i in range(2):
        await peer.send(
            wire.Doc(name, wire.Sync.UPDATE, update_setting(mine, "m", f"k{i}", "z" * 150_000))
        )
    code, reason = await peer.closed()
    assert (code, reason) == (
        4400,
        f"refused update (over 1000000 bytes owned by one identity): {name}",
    )
    room = next(r for r in cluster.status()["rooms"] if r["name"] == ROOM)
    assert 900_000 < room["bytes"]["p"] + room["bytes"]["a"] <= 1_000_000, room["bytes"]
    # Bob's documents are his own account.
    other = await RawPeer.join(url, ROOM, bob)
    for i in range(3):
        await other.send(wire.Doc(f"p/{bob.id}/{i:016d}", wire.Sync.UPDATE, blob("b")))
    await other.barrier()
    room = next(r for r in cluster.status()["rooms"] if r["name"] == ROOM)
    assert room["bytes"]["p"] > 1_400_000


async def test_a_pinned_model_size_refuses_a_worker_that_inflates_its_price(
    cluster: Cluster,
) -> None:
    """``--model-params echo=0.15``: an advert of another price factor for ``echo`` (a
    lie of 70B, or no size at all) closes 4403 with the reason and never reaches
    ``dir``; one of the pinned factor (0.2: factor 2, as 0.15) and one for another model
    are listed; the pins are published in ``dir.market.prices``."""
    cluster.market(
        "--v3-room", ROOM, "--model-params", "echo=0.15", "--model-params", f"{LONG}=0.135"
    )
    reader = await RawPeer.join(cluster.url, ROOM, new_identity())
    await reader.send(wire.Subscribe((("dir", False),)))
    directory: Doc[object] = Doc()

    async def until(check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        for _ in range(50):
            seen: dict[str, Any] = directory.get("workers", type=Map).to_py() or {}
            market: dict[str, Any] = directory.get("market", type=Map).to_py() or {}
            if check({"workers": seen, **market}):
                return {"workers": seen, **market}
            directory.apply_update((await reader.doc("dir")).payload)
        raise AssertionError("dir never matched")

    def offer(who: Identity, name: str, params: str | None) -> dict[str, Any]:
        model = {"name": name, **({"params": params} if params is not None else {})}
        made = advert.make(who, who.session_key(), name="w", engine="echo", models=[model], slots=1)
        return {"op": "advert", **made}

    published = await until(lambda d: "prices" in d)
    assert published["prices"]["pinned"] == {"echo": "0.15", LONG: "0.135"}
    for lie in ("70", None):
        liar = new_identity()
        peer = await RawPeer.join(cluster.url, ROOM, liar)
        await peer.send(wire.Control(offer(liar, "echo", lie)))
        code, reason = await peer.closed()
        shown = f"{lie} (factor 700)" if lie else "no size"
        assert (code, reason) == (
            4403,
            f"model echo is priced here as 0.15 billion parameters (factor 2), not {shown}: "
            "--model-params of this market",
        )
    # A reason longer than a close frame carries (123 bytes) arrives whole before it.
    liar = new_identity()
    peer = await RawPeer.join(cluster.url, ROOM, liar)
    await peer.send(wire.Control(offer(liar, LONG, "70")))
    denied = await peer.until(lambda f: isinstance(f, wire.Auth), what="an AUTH DENIED")
    assert isinstance(denied, wire.Auth) and denied.type is wire.AuthType.DENIED
    assert denied.body == (
        f"model {LONG} is priced here as 0.135 billion parameters (factor 2), not 70 "
        "(factor 700): --model-params of this market"
    )
    code, reason = await peer.closed()
    assert code == 4403 and len(reason.encode()) <= 123 and denied.body.startswith(reason)
    honest, other = new_identity(), new_identity()
    for who, name, size in ((honest, "echo", "0.2"), (other, "llama3", "70")):
        peer = await RawPeer.join(cluster.url, ROOM, who)
        await peer.send(wire.Control(offer(who, name, size)))
    listed = await until(lambda d: {honest.id, other.id} <= set(d["workers"]))
    assert set(listed["workers"]) == {honest.id, other.id}  # no liar among them
