"""The v3 agent's session (igora.v3.session): handshake, market keys, owned and read
documents, re-sync after reconnections, and what it does with a market's bad input.

Against a real market (``igora market --v3-room v3``), and, for what an honest market
never does (a bad frame, a refusal with a reason, a forged WELCOME), against a scripted
rogue market: a ``websockets`` server speaking ``igora.v3.wire`` with a real identity.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from nacl.signing import SigningKey
from pycrdt import Doc, Map
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.server import ServerConnection, serve
from websockets.typing import Subprotocol

from igora.config import ConfigError
from igora.errors import MarketUnreachable
from igora.identity import Identity
from igora.testing import Cluster, free_port, wait_for
from igora.v3 import known_markets, wire
from igora.v3.documents import DocumentError
from igora.v3.handshake import Challenge, Response, Welcome
from igora.v3.known_markets import KnownMarketsError, MarketKeyError
from igora.v3.outbox import MAX_BATCH_BYTES, coalesce
from igora.v3.session import (
    BadMarket,
    Event,
    EventKind,
    Refused,
    Session,
    V2Room,
    room_url,
)

ROOM = "v3"


def new_identity() -> Identity:
    return Identity(SigningKey.generate())


def tasks(doc: Doc[Any] | None) -> dict[str, Any]:
    assert doc is not None
    return dict(doc.get("tasks", type=Map).to_py() or {})


def session(url: str, identity: Identity | list[Identity], data: Path, **kw: Any) -> Session:
    return Session(url, identity, data=data, heartbeat=1.0, connect_timeout=10, **kw)


# ------------------------------------------------------------------ pure parts


def test_a_room_url_gives_the_market_the_room_and_the_pinned_key() -> None:
    key = new_identity().id
    address, pinned = room_url(f"wss://example.org/igora/v3#key={key}")
    assert (address.url, address.room, pinned) == ("wss://example.org/igora", "v3", key)
    address, pinned = room_url("ws://127.0.0.1:1234/market")
    assert (address.url, address.room, pinned) == ("ws://127.0.0.1:1234", "market", None)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ws://127.0.0.1:1234", "names no room"),
        ("ws://127.0.0.1:1234/v3#fingerprint=x", "#key=MARKET-ID"),
        ("http://127.0.0.1:1234/v3", "not a websocket URL"),
        ("ws://127.0.0.1:1234/v3#key=abc", "market key"),
    ],
)
def test_a_url_that_names_no_room_or_no_key_is_refused(url: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        Session(url, new_identity())
    with pytest.raises(ConfigError, match=r"heartbeat 0\.01 s: a market takes 0\.1 to 300 s"):
        Session("ws://127.0.0.1:1234/v3", new_identity(), heartbeat=0.01)


def test_known_markets_trusts_a_key_on_first_use_and_refuses_another_after(
    tmp_path: Path,
) -> None:
    first, second = new_identity().id, new_identity().id
    url = "ws://127.0.0.1:1234"
    assert not known_markets.check(url, first, tmp_path)
    file = known_markets.remember("ws://other:1", second, tmp_path)
    known_markets.remember(url, first, tmp_path)
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    assert known_markets.check(url, first, tmp_path)
    with pytest.raises(MarketKeyError) as err:
        known_markets.check(url, second, tmp_path)
    text = str(err.value)
    assert f"{file} line 2" in text and "HAS CHANGED" in text and second in text
    assert "remove line 2" in text


def test_a_known_markets_line_that_is_not_url_and_key_is_named(tmp_path: Path) -> None:
    file = known_markets.path(tmp_path)
    file.write_text(f"# comment\n\nws://a:1 {new_identity().id}\nws://b:1 not-a-key\n")
    with pytest.raises(KnownMarketsError, match=f"{file} line 4 is not 'URL MARKET-ID'"):
        known_markets.check("ws://a:1", new_identity().id, tmp_path)


def _update(doc: Doc[Any], key: str, value: Any) -> bytes:
    before = doc.get_state()
    doc.get("tasks", type=Map)[key] = value
    return doc.get_update(before)


def test_a_backlog_goes_out_as_one_batch_with_each_documents_updates_merged() -> None:
    a, b = Doc(), Doc()
    a_name, b_name = f"a/{new_identity().id}", f"w/{new_identity().id}"
    backlog = [
        wire.encode(wire.Presence({"state": "ready", "heartbeat": 5})),
        *(
            wire.encode(wire.Doc(a_name, wire.Sync.UPDATE, _update(a, f"t{i}", i)))
            for i in range(5)
        ),
        wire.encode(wire.Doc(b_name, wire.Sync.UPDATE, _update(b, "x", 1))),
        wire.encode(wire.Doc(a_name, wire.Sync.UPDATE, _update(a, "t5", 5))),
        wire.encode(wire.Doc(a_name, wire.Sync.STEP1, a.get_state())),
    ]
    (message,) = list(coalesce(backlog))
    frames = wire.frames(message)
    assert [type(f).__name__ for f in frames] == ["Presence", "Doc", "Doc", "Doc", "Doc"]
    docs = [f for f in frames if isinstance(f, wire.Doc)]
    assert [(d.name, d.sync) for d in docs] == [
        (a_name, wire.Sync.UPDATE),
        (b_name, wire.Sync.UPDATE),
        (a_name, wire.Sync.UPDATE),
        (a_name, wire.Sync.STEP1),
    ]
    copy = Doc()
    copy.apply_update(docs[0].payload)
    assert tasks(copy) == {f"t{i}": i for i in range(5)}
    # One frame alone is sent as it is.
    assert list(coalesce(backlog[:1])) == backlog[:1]


def test_a_backlog_past_the_batch_limit_is_split_in_order() -> None:
    big = wire.encode(wire.Control({"op": "x", "pad": "p" * (MAX_BATCH_BYTES // 2)}))
    small = wire.encode(wire.Control({"op": "y"}))
    messages = list(coalesce([big, small, big, small, big]))
    assert len(messages) == 3
    flat = [f for m in messages for f in wire.frames(m)]
    assert [f.body["op"] for f in flat if isinstance(f, wire.Control)] == list("xyxyx")


def test_a_session_owns_only_the_documents_of_its_identities() -> None:
    me, other = new_identity(), new_identity()
    s = Session("ws://127.0.0.1:1/v3", me)
    assert isinstance(s.own(f"a/{me.id}"), Doc)
    assert isinstance(s.own(f"in/{other.id}"), Doc)  # the broker's: sent with the lease
    for name in (f"a/{other.id}", f"p/{other.id}/{'t' * 16}", "dir", "who", "nonsense"):
        with pytest.raises(DocumentError):
            s.own(name)
    with pytest.raises(DocumentError, match="not a prefix"):
        s.subscribe("r/", prefix=True)


def test_only_owned_documents_are_observed() -> None:
    """An observer makes pycrdt encode every update applied: the documents only read (the
    market's updates) have none; a document read first gets one once it is owned, and
    loses it with the Doc."""
    me = new_identity()
    s = Session("ws://127.0.0.1:1/v3", me)
    mine, task = f"a/{me.id}", f"p/{me.id}/{'t' * 16}"
    s.subscribe("dir")
    s.subscribe(f"in/{me.id}")
    s.subscribe(mine)
    assert set(s.docs) == {"dir", f"in/{me.id}", mine} and not s._doc_subs
    s.own(mine)
    s.own(task, new=True)
    assert set(s._doc_subs) == {mine, task}
    s.drop(task)
    assert set(s._doc_subs) == {mine}


# ------------------------------------------------------------------ a real market


@pytest.fixture
def v3_market(cluster: Cluster) -> Cluster:
    cluster.market("--v3-room", ROOM)
    return cluster


def room(cluster: Cluster) -> str:
    return f"{cluster.url}/{ROOM}"


async def until(events: AsyncIterator[Event], check: Callable[[Event], bool], what: str) -> Event:
    async def first() -> Event:
        async for event in events:
            if check(event):
                return event
        raise AssertionError("events ended")

    try:
        return await asyncio.wait_for(first(), 20)
    except asyncio.TimeoutError:
        raise AssertionError(f"not within 20 s: {what}") from None


async def test_a_second_session_of_the_owner_reads_what_the_first_writes(
    v3_market: Cluster, tmp_path: Path
) -> None:
    me, stranger = new_identity(), new_identity()
    name = f"a/{me.id}"
    async with (
        session(room(v3_market), me, tmp_path, name="writer") as writer,
        session(room(v3_market), me, tmp_path, name="reader") as reader,
        session(room(v3_market), stranger, tmp_path, name="stranger") as other,
    ):
        assert writer.market == reader.market is not None
        assert writer.granted == [me.id]
        doc = writer.own(name)
        doc.get("tasks", type=Map)["t1"] = {"model": "m"}
        read = reader.subscribe(name)  # after the write: the market sends the state
        await wait_for(lambda: tasks(read) == {"t1": {"model": "m"}}, 20, "the state", v3_market)
        with doc.transaction():
            doc.get("tasks", type=Map)["t2"] = {"model": "n"}
            del doc.get("tasks", type=Map)["t1"]
        await wait_for(lambda: set(tasks(read)) == {"t2"}, 20, "the update", v3_market)

        events = other.events()
        task = f"p/{me.id}/{'t' * 16}"  # a task document: its owner, or attached, reads it
        assert other.subscribe(task) is not None
        refused = await until(events, lambda e: e.kind is EventKind.REFUSED, "a refusal")
        assert (refused.name, refused.code) == (task, wire.Code.REFUSED)
        assert task not in other.docs
        # In an open market's v3 room any identity may be a broker, and read by prefix:
        # the state of each document under it, then their updates.
        assert other.subscribe("a/", prefix=True) is None
        assert other.subscribe("board") is not None  # anyone may read the board
        new = await until(events, lambda e: e.kind is EventKind.NEW, "a document by prefix")
        assert new.name == name and tasks(other.docs[name]) == {"t2": {"model": "n"}}
        doc.get("tasks", type=Map)["t3"] = {"model": "o"}
        await wait_for(lambda: "t3" in tasks(other.docs[name]), 20, "an update", v3_market)
        assert other.connected
    # One line for the market in known_markets, written by the first session.
    lines = known_markets.path(tmp_path).read_text().splitlines()
    assert lines == [f"{v3_market.url} {writer.market}"]


async def test_a_gateway_session_proves_several_identities_and_writes_for_each(
    v3_market: Cluster, tmp_path: Path
) -> None:
    alice, bob = new_identity(), new_identity()
    async with (
        session(room(v3_market), [alice, bob], tmp_path, name="gateway") as gateway,
        session(room(v3_market), bob, tmp_path, name="bob") as reader,
    ):
        assert sorted(gateway.granted) == sorted([alice.id, bob.id])
        for who in (alice, bob):
            gateway.own(f"a/{who.id}").get("tasks", type=Map)["t"] = who.id
        read = reader.subscribe(f"a/{bob.id}")
        await wait_for(lambda: tasks(read) == {"t": bob.id}, 20, "bob's header", v3_market)


async def test_an_owner_restarted_with_an_empty_doc_gets_its_content_back(
    v3_market: Cluster, tmp_path: Path
) -> None:
    me = new_identity()
    name = f"a/{me.id}"
    async with session(room(v3_market), me, tmp_path, name="first") as first:
        first.own(name).get("tasks", type=Map)["old"] = 1
        async with session(room(v3_market), me, tmp_path, name="probe") as probe:
            seen = probe.subscribe(name)
            await wait_for(lambda: tasks(seen) == {"old": 1}, 20, "stored", v3_market)
    async with session(room(v3_market), me, tmp_path, name="second") as second:
        events = second.events()
        doc = second.own(name)  # empty: a new process
        await until(events, lambda e: e.kind is EventKind.CHANGED and e.name == name, "content")
        assert tasks(doc) == {"old": 1}
        doc.get("tasks", type=Map)["new"] = 2
        async with session(room(v3_market), me, tmp_path, name="reader") as reader:
            read = reader.subscribe(name)
            await wait_for(lambda: tasks(read) == {"old": 1, "new": 2}, 20, "both", v3_market)


async def test_writes_made_while_the_market_is_down_arrive_after_it_restarts(
    cluster: Cluster, tmp_path: Path
) -> None:
    market = cluster.market("--v3-room", ROOM)
    me = new_identity()
    name = f"a/{me.id}"
    async with (
        session(room(cluster), me, tmp_path, name="writer", backoff_max=0.5) as writer,
        session(room(cluster), me, tmp_path, name="reader", backoff_max=0.5) as reader,
    ):
        doc = writer.own(name)
        read = reader.subscribe(name)
        doc.get("tasks", type=Map)["before"] = 1
        await wait_for(lambda: tasks(read) == {"before": 1}, 20, "the first write", cluster)
        writer_events, reader_events = writer.events(), reader.events()
        market.stop()
        await until(writer_events, lambda e: e.kind is EventKind.DISCONNECTED, "disconnected")
        doc.get("tasks", type=Map)["offline"] = 2  # nobody to send it to
        with doc.transaction():
            doc.get("tasks", type=Map)["offline2"] = 3
        cluster.market("--v3-room", ROOM)  # same port, same data folder
        await until(writer_events, lambda e: e.kind is EventKind.CONNECTED, "reconnected")
        await until(reader_events, lambda e: e.kind is EventKind.CONNECTED, "reconnected")
        await wait_for(
            lambda: tasks(read) == {"before": 1, "offline": 2, "offline2": 3},
            20,
            "the writes made offline",
            cluster,
        )
        doc.get("tasks", type=Map)["after"] = 4
        await wait_for(lambda: "after" in tasks(read), 20, "a write after", cluster)


async def test_a_v2_room_is_reported_as_v2(v3_market: Cluster, tmp_path: Path) -> None:
    with pytest.raises(V2Room, match="speaks Igora protocol 2"):
        async with session(f"{v3_market.url}/market", new_identity(), tmp_path):
            pass


async def test_a_market_with_another_key_at_a_known_url_is_refused(
    cluster: Cluster, tmp_path: Path
) -> None:
    first = cluster.market("--v3-room", ROOM)
    me = new_identity()
    async with session(room(cluster), me, tmp_path) as s:
        key = s.market
    first.stop()
    cluster.data = cluster.dir / "other-data"  # another folder: another market key
    cluster.market("--v3-room", ROOM)
    file = known_markets.path(tmp_path)
    with pytest.raises(MarketKeyError) as err:
        async with session(room(cluster), me, tmp_path):
            pass
    text = str(err.value)
    assert f"{file} line 1 holds {key}" in text and "HAS CHANGED" in text
    assert file.read_text().splitlines() == [f"{cluster.url} {key}"]  # unchanged


async def test_a_pinned_market_key_is_checked_and_nothing_is_kept(
    v3_market: Cluster, tmp_path: Path
) -> None:
    me = new_identity()
    wrong = new_identity().id
    with pytest.raises(MarketKeyError, match=f"not {wrong} as given"):
        async with session(f"{room(v3_market)}#key={wrong}", me, tmp_path):
            pass
    status = v3_market.status()
    right = status["market"]["id"]
    async with session(room(v3_market), me, tmp_path, market_key=right) as s:
        assert s.market == right
    assert not known_markets.path(tmp_path).exists()


# ------------------------------------------------------------------ a rogue market

Script = Callable[[ServerConnection, int], Awaitable[None]]


class RogueMarket:
    """A websocket server that does the handshake with its own key, then runs ``script``
    for each connection (its number from 0); keeps every frame it reads after WELCOME."""

    def __init__(self, script: Script, identity: Identity | None = None) -> None:
        self.identity = identity or new_identity()
        self.script = script
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}/{ROOM}"
        self.connections = 0
        self.received: list[list[wire.Frame]] = []  # per connection
        self.welcome_key: Identity | None = None  # sign the WELCOME with another key
        self.refuse: tuple[str | None, int, str] | None = None  # deny, close code, reason
        self.grant: int | None = None  # admit only the first ``grant`` ids

    async def _handler(self, ws: ServerConnection) -> None:
        n = self.connections
        self.connections += 1
        self.received.append([])
        challenge = Challenge.fresh(self.identity.id, ROOM)
        await ws.send(wire.encode(challenge.frame()))
        frame = wire.decode(bytes(await ws.recv()))
        assert isinstance(frame, wire.Auth)
        response = Response.read(frame)
        t = response.check(challenge)
        if self.refuse is not None:
            denied, code, reason = self.refuse
            if denied is not None:
                await ws.send(wire.denied(denied))
            await ws.close(code, reason)
            return
        signer = self.welcome_key or self.identity
        granted = response.ids[: self.grant] if self.grant is not None else response.ids
        await ws.send(wire.encode(Welcome.make(signer, t, granted, {}).frame()))
        await self.script(ws, n)

    async def read(self, ws: ServerConnection, n: int) -> None:
        """Keep what the session sends until it closes."""
        with contextlib.suppress(Exception):
            async for message in ws:
                assert isinstance(message, bytes)
                self.received[n].extend(wire.frames(message))

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[RogueMarket]:
        async with serve(
            self._handler, "127.0.0.1", self.port, subprotocols=[Subprotocol(wire.SUBPROTOCOL)]
        ):
            yield self


def doc_frame(name: str, update: bytes) -> bytes:
    return wire.encode(wire.Doc(name, wire.Sync.UPDATE, update))


@pytest.mark.parametrize(
    ("bad", "logged"),
    [
        (b"\x01\x00", "a frame that is not v3 (unknown frame kind 1)"),
        (None, "a bad update of"),  # an update pycrdt cannot read
        (wire.encode(wire.Doc("x/../etc", wire.Sync.UPDATE, b"\x00\x00")), "unknown document"),
    ],
)
async def test_bad_input_from_the_market_is_one_line_and_a_new_connection(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, bad: bytes | None, logged: str
) -> None:
    me = new_identity()
    name = f"a/{me.id}"
    source = Doc()
    good = _update(source, "t", "fine")

    async def script(ws: ServerConnection, n: int) -> None:
        if n == 0:
            await ws.send(bad if bad is not None else doc_frame(name, b"\x01\xff\xff\xff\x7f"))
            await rogue.read(ws, n)
        else:
            await ws.send(doc_frame(name, good))
            await rogue.read(ws, n)

    rogue = RogueMarket(script)
    caplog.set_level(logging.WARNING, "igora.v3")
    async with rogue.running():
        s = Session(rogue.url, me, data=tmp_path, market_key=rogue.identity.id, name="victim")
        async with s:
            read = s.subscribe(name)
            await wait_for(lambda: tasks(read) == {"t": "fine"}, 20, "the good update")
            assert s.connected and s.error is None
    assert rogue.connections == 2
    lines = [r.getMessage() for r in caplog.records if "reconnecting" in r.getMessage()]
    assert len(lines) == 1 and logged in lines[0], lines


@pytest.mark.parametrize(
    ("denied", "code", "reason", "expected"),
    [
        ("not a member of this market", 4403, "forbidden", "refused us (close 4403): not a member"),
        (None, 4401, "handshake refused: bad signature", "close 4401): handshake refused"),
    ],
)
async def test_a_refusal_names_the_reason_the_market_gave(
    tmp_path: Path,
    denied: str | None,
    code: int,
    reason: str,
    expected: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def script(ws: ServerConnection, n: int) -> None:
        await rogue.read(ws, n)

    rogue = RogueMarket(script)
    rogue.refuse = (denied, code, reason)
    caplog.set_level(logging.DEBUG, "igora.v3")
    async with rogue.running():
        with pytest.raises(Refused) as err:
            async with Session(rogue.url, new_identity(), data=tmp_path):
                pass
    assert expected in str(err.value) and err.value.code == code
    assert rogue.connections == 1  # no retry: retrying cannot cure it
    # Raised to the caller of start, which says it (a command prints it): not logged
    # as an error too, which would print the same sentence twice.
    said = [r for r in caplog.records if expected in r.getMessage()]
    assert said and all(r.levelno == logging.DEBUG for r in said)


async def test_a_session_banned_after_its_welcome_gives_up_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def script(ws: ServerConnection, n: int) -> None:
        await asyncio.sleep(0.2)
        await ws.send(wire.denied("banned: spam"))
        await ws.close(4403, "banned")

    rogue = RogueMarket(script)
    async with rogue.running():
        s = Session(rogue.url, new_identity(), data=tmp_path, market_key=rogue.identity.id)
        events = s.events()
        async with s:
            failed = await until(events, lambda e: e.kind is EventKind.FAILED, "a failure")
            assert isinstance(s.error, Refused) and s.error.code == 4403
            # Nobody waits for it now: the log says it, as an error.
            assert any(
                r.levelno == logging.ERROR and "banned: spam" in r.getMessage()
                for r in caplog.records
            )
            assert "banned: spam" in failed.text and not s.connected
            assert not s.control({"op": "x"})  # nothing is sent any more
    assert rogue.connections == 1


async def test_a_welcome_signed_by_another_key_is_refused(tmp_path: Path) -> None:
    async def script(ws: ServerConnection, n: int) -> None:
        await rogue.read(ws, n)

    rogue = RogueMarket(script)
    rogue.welcome_key = new_identity()
    async with rogue.running():
        with pytest.raises(BadMarket, match="signature does not verify"):
            async with Session(rogue.url, new_identity(), data=tmp_path):
                pass
    assert not known_markets.path(tmp_path).exists()  # nothing trusted on a failed proof


async def test_presence_goes_out_only_when_nothing_else_did(tmp_path: Path) -> None:
    async def script(ws: ServerConnection, n: int) -> None:
        await rogue.read(ws, n)

    rogue = RogueMarket(script)
    me = new_identity()
    async with rogue.running():
        s = Session(
            rogue.url,
            me,
            data=tmp_path,
            market_key=rogue.identity.id,
            heartbeat=0.2,
            state={"type": "worker"},
        )
        async with s:

            def presences() -> list[wire.Presence]:
                return [f for f in rogue.received[0] if isinstance(f, wire.Presence)]

            await wait_for(lambda: len(presences()) >= 3, 20, "three presence frames")
            assert presences()[0].body == {"state": {"type": "worker"}, "heartbeat": 0.2}
            s.set_state(state="busy")
            await wait_for(
                lambda: presences()[-1].body["state"] == {"type": "worker", "state": "busy"},
                20,
                "the new state at once",
            )


async def test_updates_written_in_one_turn_go_out_as_one_merged_update(tmp_path: Path) -> None:
    async def script(ws: ServerConnection, n: int) -> None:
        await rogue.read(ws, n)

    rogue = RogueMarket(script)
    me = new_identity()
    name = f"a/{me.id}"
    async with rogue.running():
        s = Session(rogue.url, me, data=tmp_path, market_key=rogue.identity.id)
        async with s:
            doc = s.own(name)
            for i in range(50):
                doc.get("tasks", type=Map)[f"t{i}"] = i
            assert s.control({"op": "advert", "n": 1})

            def updates() -> list[wire.Doc]:
                return [
                    f
                    for f in rogue.received[0]
                    if isinstance(f, wire.Doc) and f.sync is wire.Sync.UPDATE
                ]

            await wait_for(
                lambda: any(isinstance(f, wire.Control) for f in rogue.received[0]), 20, "sent"
            )
            (update,) = updates()
            copy = Doc()
            copy.apply_update(update.payload)
            assert tasks(copy) == {f"t{i}": i for i in range(50)}
            kinds = [type(f).__name__ for f in rogue.received[0]]
            assert kinds[:2] == ["Presence", "Doc"]  # the WELCOME's batch: presence, step 1


@pytest.fixture(autouse=True)
def _no_identity_from_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Sessions given no ``data`` would use IGORA_DATA: never the user's own folder."""
    monkeypatch.setenv("IGORA_DATA", str(tmp_path / "igora-data"))
    assert os.environ["IGORA_DATA"]


async def test_documents_the_market_sends_appear_change_and_are_dropped(tmp_path: Path) -> None:
    me, asker, worker = new_identity(), new_identity(), new_identity()
    header, run, mine = f"a/{asker.id}", f"r/{worker.id}/{'t' * 16}.1", f"w/{me.id}"
    source = Doc()

    async def script(ws: ServerConnection, n: int) -> None:
        reader = asyncio.create_task(rogue.read(ws, n))
        await wait_for(lambda: subscribed(n, "a/"), 20, "the prefix subscription")
        await ws.send(
            wire.batch(
                [
                    wire.encode(wire.Doc(header, wire.Sync.STEP2, _update(source, "h", 1))),
                    doc_frame(run, _update(Doc(), "chunk", "c0")),  # attached by a broker
                ]
            )
        )
        await wait_for(lambda: "gone" in steps, 20, "the test's go")
        await ws.send(wire.encode(wire.Notice(wire.Code.DROPPED, header, "dropped by owner")))
        await wait_for(lambda: unsubscribed(n, mine), 20, "the unsubscription")
        await ws.send(doc_frame(mine, _update(Doc(), "late", 1)))  # crossed the UNSUB
        await ws.send(doc_frame(run, _update(Doc(), "chunk2", "c1")))
        await reader

    def subscribed(n: int, name: str, unsub: bool = False) -> bool:
        return any(
            isinstance(f, wire.Subscribe)
            and f.unsubscribe is unsub
            and any(sub == name for sub, _ in f.names)
            for f in rogue.received[n]
        )

    def unsubscribed(n: int, name: str) -> bool:
        return subscribed(n, name, unsub=True)

    steps: list[str] = []
    rogue = RogueMarket(script)
    async with rogue.running():
        s = Session(rogue.url, me, data=tmp_path, market_key=rogue.identity.id)
        events = s.events()
        async with s:
            assert s.subscribe("a/", prefix=True) is None
            s.subscribe(mine)
            seen = [await until(events, lambda e: e.kind is EventKind.NEW, "new") for _ in "12"]
            assert {e.name for e in seen} == {header, run}
            await wait_for(lambda: tasks(s.docs.get(header)) == {"h": 1}, 20, "the header")
            steps.append("gone")
            dropped = await until(events, lambda e: e.kind is EventKind.DROPPED, "dropped")
            assert (dropped.name, dropped.text) == (header, "dropped by owner")
            assert header not in s.docs
            s.unsubscribe(mine)
            await until(events, lambda e: e.kind is EventKind.CHANGED and e.name == run, "run")
            assert tasks(s.docs[run]) == {"chunk": "c0", "chunk2": "c1"}
            assert mine not in s.docs  # the late update made no Doc
    assert rogue.connections == 1


async def test_a_document_attached_again_after_its_unsubscription_is_read(
    tmp_path: Path,
) -> None:
    """A worker unsubscribes the prompt of a task taken from it; the broker gives the task
    back to it and attaches the prompt again: the market sends its whole state (a STEP2),
    which is read, and so are its later updates. An update that only crossed the UNSUB
    is not (the test above)."""
    me, asker = new_identity(), new_identity()
    prompt, marker = f"p/{asker.id}/{'t' * 16}", f"a/{asker.id}"
    source = Doc()
    first = _update(source, "ct", "one")

    async def script(ws: ServerConnection, n: int) -> None:
        reader = asyncio.create_task(rogue.read(ws, n))
        await ws.send(wire.encode(wire.Doc(prompt, wire.Sync.STEP2, first)))  # attached
        await wait_for(lambda: unsubscribed(n, prompt), 20, "the unsubscription")
        await ws.send(doc_frame(prompt, _update(source, "late", 1)))  # crossed the UNSUB
        await ws.send(doc_frame(marker, _update(Doc(), "m", 1)))  # read after it
        await wait_for(lambda: "again" in steps, 20, "the test's go")
        await ws.send(wire.encode(wire.Doc(prompt, wire.Sync.STEP2, source.get_update())))
        await ws.send(doc_frame(prompt, _update(source, "grant", "w")))
        await reader

    def unsubscribed(n: int, name: str) -> bool:
        return any(
            isinstance(f, wire.Subscribe) and f.unsubscribe and (name, False) in f.names
            for f in rogue.received[n]
        )

    steps: list[str] = []
    rogue = RogueMarket(script)
    async with rogue.running():
        s = Session(rogue.url, me, data=tmp_path, market_key=rogue.identity.id)
        events = s.events()
        async with s:
            await until(events, lambda e: e.kind is EventKind.NEW and e.name == prompt, "new")
            assert tasks(s.docs[prompt]) == {"ct": "one"}
            s.unsubscribe(prompt)
            assert prompt not in s.docs
            await until(events, lambda e: e.kind is EventKind.NEW and e.name == marker, "mark")
            assert prompt not in s.docs  # the late update made no Doc
            steps.append("again")
            await until(events, lambda e: e.kind is EventKind.NEW and e.name == prompt, "again")
            await wait_for(lambda: "grant" in tasks(s.docs.get(prompt)), 20, "the next update")
            assert tasks(s.docs[prompt]) == {"ct": "one", "late": 1, "grant": "w"}
    assert rogue.connections == 1


async def test_a_market_document_is_read_afresh_when_the_market_lost_part_of_it(
    tmp_path: Path,
) -> None:
    """The market wrote ``who`` and was killed before it stored its last entry; restarted,
    it loads the rest, removes every entry (nobody is connected) and writes the agents
    that come back. The session held the lost entry: it drops its copy and reads the new
    market's, so the entry the new market writes for the same key is the one it sees
    (kept otherwise: the old market's client id is the higher, the stale entry won)."""
    me = new_identity()
    old, new = Doc(client_id=2**40), Doc(client_id=7)
    agents = old.get("agents", type=Map)
    agents["w1"] = "old"
    stored = old.get_update()
    agents["w2"] = "lost"  # relayed, never stored
    new.apply_update(stored)
    again = new.get("agents", type=Map)
    del again["w1"]  # the restarted market's clean-up at load

    async def script(ws: ServerConnection, n: int) -> None:
        reader = asyncio.create_task(rogue.read(ws, n))
        if n == 0:
            await ws.send(wire.encode(wire.Doc("who", wire.Sync.STEP2, old.get_update())))
            await wait_for(lambda: "restart" in steps, 20, "the test's go")
            await ws.close()
            return
        await ws.send(wire.encode(wire.Doc("who", wire.Sync.STEP2, new.get_update())))
        before = new.get_state()
        again["w2"] = "back"  # the worker reconnected
        await ws.send(doc_frame("who", new.get_update(before)))
        await reader

    steps: list[str] = []
    rogue = RogueMarket(script)
    async with rogue.running():
        s = Session(rogue.url, me, data=tmp_path, market_key=rogue.identity.id, heartbeat=1.0)
        events = s.events()
        async with s:
            s.subscribe("who")
            await wait_for(lambda: agents_of(s) == {"w1": "old", "w2": "lost"}, 20, "who")
            steps.append("restart")
            await until(events, lambda e: e.kind is EventKind.DISCONNECTED, "the restart")
            await wait_for(lambda: agents_of(s) == {"w2": "back"}, 20, "the new market's who")
    assert rogue.connections == 2


def agents_of(s: Session) -> dict[str, Any]:
    doc = s.docs.get("who")
    return {} if doc is None else dict(doc.get("agents", type=Map).items())


async def test_a_write_made_while_the_market_s_update_is_applied_is_sent(tmp_path: Path) -> None:
    me, other = new_identity(), new_identity()
    theirs, mine = f"a/{other.id}", f"a/{me.id}"

    async def script(ws: ServerConnection, n: int) -> None:
        reader = asyncio.create_task(rogue.read(ws, n))
        await ws.send(doc_frame(theirs, _update(Doc(), "t", 1)))
        await reader

    rogue = RogueMarket(script)
    async with rogue.running():
        s = Session(rogue.url, me, data=tmp_path, market_key=rogue.identity.id, connect_timeout=10)
        read = s.subscribe(theirs)
        own = s.own(mine)
        assert read is not None
        # An observer of the document read writes the document owned, inside the apply.
        kept = read.get("tasks", type=Map).observe(
            lambda _: own.get("tasks", type=Map).update({"r": 1})
        )
        async with s:
            await wait_for(
                lambda: any(
                    isinstance(f, wire.Doc) and f.name == mine and f.sync is wire.Sync.UPDATE
                    for f in rogue.received[0]
                ),
                20,
                "the owner's write",
            )
        assert tasks(read) == {"t": 1}
        assert kept is not None  # the observer lived until here


async def test_a_broker_writes_inboxes_with_the_lease_and_attaches_task_documents(
    v3_market: Cluster, tmp_path: Path
) -> None:
    broker_id, worker_id, asker_id = new_identity(), new_identity(), new_identity()
    inbox, prompt = f"in/{worker_id.id}", f"p/{asker_id.id}/{'T' * 16}"
    url = room(v3_market)
    async with (
        session(url, broker_id, tmp_path, name="broker") as broker,
        session(url, worker_id, tmp_path, name="worker") as worker,
        session(url, asker_id, tmp_path, name="asker") as asker,
    ):
        worker_events = worker.events()
        read_inbox = worker.subscribe(inbox)
        asker.own(prompt).get("tasks", type=Map)["pt"] = "hello"
        # Written before the lease: kept, and sent once the lease is granted.
        assignments = broker.own(inbox)
        assignments.get("tasks", type=Map)["T"] = {"attempt": 1}
        await asyncio.sleep(0.3)
        assert tasks(read_inbox) == {} and broker.connected  # not sent: no 4403
        broker_events = broker.events()
        assert broker.control({"op": "lease"})
        granted = await until(broker_events, lambda e: e.code == wire.Code.LEASE_GRANTED, "lease")
        assert "epoch" in granted.text and broker.lease
        await wait_for(lambda: tasks(read_inbox) == {"T": {"attempt": 1}}, 20, "the inbox")
        broker.control({"op": "attach", "to": worker_id.id, "docs": [prompt]})
        new = await until(worker_events, lambda e: e.kind is EventKind.NEW, "the attachment")
        assert new.name == prompt
        await wait_for(lambda: tasks(worker.docs.get(prompt)) == {"pt": "hello"}, 20, "prompt")
        asker.drop(prompt)
        dropped = await until(worker_events, lambda e: e.kind is EventKind.DROPPED, "dropped")
        assert dropped.name == prompt and prompt not in worker.docs and prompt not in asker.docs


async def test_no_market_at_the_url_is_market_unreachable_in_time(tmp_path: Path) -> None:
    url = f"ws://127.0.0.1:{free_port()}/{ROOM}"
    with pytest.raises(MarketUnreachable, match=f"no market answered at {url} within 1 s"):
        async with Session(url, new_identity(), data=tmp_path, connect_timeout=1):
            pass


def entry(doc: Doc[Any] | None, map_name: str, key: str) -> Any:
    assert doc is not None
    return (doc.get(map_name, type=Map).to_py() or {}).get(key)


async def test_the_market_s_documents_show_its_key_and_the_session_s_presence(
    v3_market: Cluster, tmp_path: Path
) -> None:
    me = new_identity()
    state = {"type": "worker", "name": "w1"}
    async with session(room(v3_market), me, tmp_path, state=state) as s:
        directory, present = s.subscribe("dir"), s.subscribe("who")  # who: as a broker may
        await wait_for(lambda: entry(directory, "market", "key") == s.market, 20, "dir")
        await wait_for(
            lambda: (entry(present, "agents", me.id) or {}).get("name") == "w1", 20, "who"
        )
        s.set_state(name="w2")
        await wait_for(lambda: entry(present, "agents", me.id)["name"] == "w2", 20, "renamed")
        assert entry(present, "agents", me.id)["type"] == "worker"


async def test_a_market_restarted_empty_gets_the_owned_documents_back_from_their_owner(
    cluster: Cluster, tmp_path: Path
) -> None:
    market = cluster.market("--v3-room", ROOM, memory=True)
    me = new_identity()
    name = f"a/{me.id}"
    async with (
        session(room(cluster), me, tmp_path, name="writer", backoff_max=0.5) as writer,
        session(room(cluster), me, tmp_path, name="reader", backoff_max=0.5) as reader,
    ):
        writer.own(name).get("tasks", type=Map).update({"a": 1, "b": 2})
        read = reader.subscribe(name)
        await wait_for(lambda: tasks(read) == {"a": 1, "b": 2}, 20, "the writes", cluster)
        events = reader.events()
        market.kill()  # no store: the restarted market knows nothing
        await until(events, lambda e: e.kind is EventKind.DISCONNECTED, "disconnected")
        cluster.market("--v3-room", ROOM, memory=True)
        await until(events, lambda e: e.kind is EventKind.CONNECTED, "reconnected")
        async with session(room(cluster), me, tmp_path, name="newcomer") as newcomer:
            fresh = newcomer.subscribe(name)
            await wait_for(lambda: tasks(fresh) == {"a": 1, "b": 2}, 20, "re-sent", cluster)


async def test_documents_of_an_identity_the_market_did_not_admit_are_not_sent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def script(ws: ServerConnection, n: int) -> None:
        await rogue.read(ws, n)

    admitted, refused = new_identity(), new_identity()
    rogue = RogueMarket(script)
    rogue.grant = 1
    caplog.set_level(logging.WARNING, "igora.v3")
    async with rogue.running():
        s = Session(rogue.url, [admitted, refused], data=tmp_path, market_key=rogue.identity.id)
        async with s:
            assert s.granted == [admitted.id]
            for who in (refused, admitted):  # the admitted one last: when it is there, ...
                s.own(f"a/{who.id}").get("tasks", type=Map)["t"] = 1

            def names() -> set[str]:
                return {f.name for f in rogue.received[0] if isinstance(f, wire.Doc)}

            await wait_for(lambda: f"a/{admitted.id}" in names(), 20, "the admitted's write")
            assert f"a/{refused.id}" not in names()  # ... the other was not sent before it
    assert any(f"but not {refused.id[:8]}" in r.getMessage() for r in caplog.records)


async def test_a_stop_that_lands_as_a_handshake_frame_arrives_ends_the_session(
    v3_market: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``stop`` called in the very turn a handshake frame arrives (an agent closed while it
    reconnects to a restarted market): the session ends there and never connects.
    ``asyncio.wait_for`` (before Python 3.12) drops a cancellation that lands as what it
    waits for completes: the session went on to its WELCOME, connected for good, and
    ``stop`` waited for it forever (a test hung 300 s after a market restart)."""
    s = session(room(v3_market), new_identity(), tmp_path, name="stopped")
    seen: list[EventKind] = []
    s.observe(lambda event: seen.append(event.kind))
    stopping: list[asyncio.Task[None]] = []
    recv = ClientConnection.recv

    async def frame_then_stop(ws: ClientConnection, *args: Any, **kwargs: Any) -> Any:
        message = await recv(ws, *args, **kwargs)
        if not stopping:  # the CHALLENGE: the stop runs before the session reads it
            stopping.append(asyncio.get_running_loop().create_task(s.stop()))
        return message

    monkeypatch.setattr(ClientConnection, "recv", frame_then_stop)
    await s.start(wait=False)
    await wait_for(lambda: stopping, 20, "a handshake frame", v3_market)
    done, _ = await asyncio.wait(stopping, timeout=5)
    assert done, "stop() did not end the session within 5 s"
    await asyncio.sleep(0.5)  # a session that went on would be welcomed by now
    assert EventKind.CONNECTED not in seen and not s.connected


async def test_a_broker_back_after_a_market_restart_reads_what_askers_wrote_meanwhile(
    cluster: Cluster, tmp_path: Path
) -> None:
    """A prefix subscription brings the state of the documents under it, not only the
    updates that follow: the broker that comes back last after a market restart reads
    the tasks an asker put and the ones it deleted meanwhile, and what it writes next.
    With updates alone it never saw them, nor any later task of that asker (Yjs kept
    them pending for want of the earlier ones): the room stalled."""
    market = cluster.market("--v3-room", ROOM)
    me, broker_id = new_identity(), new_identity()
    name = f"a/{me.id}"

    def held() -> dict[str, Any]:  # the broker's copy (none before the first update)
        return tasks(broker.docs[name]) if name in broker.docs else {}

    async with (
        session(room(cluster), me, tmp_path, name="asker", backoff_max=0.5) as asker,
        session(room(cluster), broker_id, tmp_path, name="broker") as broker,
    ):
        headers = asker.own(name).get("tasks", type=Map)
        broker.subscribe("a/", prefix=True)
        directory = broker.subscribe("dir")  # once read, the prefix's SUB was handled
        await wait_for(lambda: entry(directory, "market", "key"), 20, "dir", cluster)
        headers["read"] = 1
        await wait_for(lambda: held() == {"read": 1}, 20, "read", cluster)
        events = asker.events()
        await broker.stop()  # it comes back last
        market.kill()
        await until(events, lambda e: e.kind is EventKind.DISCONNECTED, "disconnected")
        cluster.market("--v3-room", ROOM)  # same port, same data folder
        await until(events, lambda e: e.kind is EventKind.CONNECTED, "reconnected")
        with asker.docs[name].transaction():
            del headers["read"]  # its answer read
            headers["new"] = 2  # a task put
        async with session(room(cluster), me, tmp_path, name="probe") as probe:
            stored = probe.subscribe(name)
            await wait_for(lambda: tasks(stored) == {"new": 2}, 20, "at the market", cluster)
        await broker.start()
        await wait_for(lambda: held() == {"new": 2}, 20, "meanwhile")
        headers["next"] = 3
        await wait_for(lambda: "next" in held(), 20, "the next", cluster)
