"""Protocol 3's pure parts: frames, document names and rules, the handshake."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nacl.signing import SigningKey

from igora.identity import Identity
from igora.v3 import documents as d
from igora.v3 import wire as w
from igora.v3.handshake import Challenge, HandshakeError, Response, Welcome

A = Identity(SigningKey.generate())
B = Identity(SigningKey.generate())
M = Identity(SigningKey.generate())
TID = "abcdefghijKLMN-_"

names = st.text(max_size=40)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
frames = st.one_of(
    st.builds(w.Doc, names, st.sampled_from(list(w.Sync)), st.binary(max_size=64)),
    st.builds(w.Auth, st.just(w.AuthType.DENIED), st.text(max_size=40)),
    st.builds(
        w.Auth,
        st.sampled_from([w.AuthType.CHALLENGE, w.AuthType.RESPONSE, w.AuthType.WELCOME]),
        st.dictionaries(st.text(max_size=8), json_values, max_size=4),
    ),
    st.builds(
        w.Subscribe, st.lists(st.tuples(names, st.booleans()), max_size=5).map(tuple), st.booleans()
    ),
    st.builds(w.Notice, st.integers(0, 1000), names, st.text(max_size=40)),
    st.builds(
        w.Control,
        st.dictionaries(st.text(max_size=8), json_values, max_size=3).map(
            lambda b: {**b, "op": "x"}
        ),
    ),
)


@given(frames)
def test_every_frame_reads_back_as_written(frame: w.Frame) -> None:
    assert w.decode(w.encode(frame)) == frame


@given(st.lists(frames, min_size=1, max_size=5))
def test_a_batch_reads_back_as_its_frames(members: list[w.Frame]) -> None:
    assert w.frames(w.batch([w.encode(f) for f in members])) == members


@given(frames, st.data())
def test_a_cut_or_lengthened_frame_is_refused(frame: w.Frame, data: st.DataObject) -> None:
    raw = w.encode(frame)
    cut = data.draw(st.integers(0, len(raw) - 1))
    for bad in (raw[:cut], raw + b"\x00"):
        try:
            decoded = w.decode(bad)
        except w.WireError:
            continue
        assert decoded != frame  # a shorter valid frame is another frame, never this one


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"\x01\x00", "unknown frame kind 1"),
        (b"\x00\x03dir\x05\x00", "unknown sync message type 5"),
        (w.encode(w.Batch((w.encode(w.Batch((b"\x06\x02{}",))),))), "a BATCH inside a BATCH"),
        (b"\x08\x00", "a BATCH of 0 frames"),
        (b"\x09\x02{}", 'needs a string "op"'),
        (b"\x06\x02[]", "must be a JSON object"),
        (b"\x06\x03NaN", "is not JSON"),
        (b"\x04\x01\x03dir\x02", "unknown subscription flags 2"),
    ],
)
def test_malformed_frames_name_their_fault(raw: bytes, why: str) -> None:
    with pytest.raises(w.WireError, match=why):
        w.frames(raw)


def test_deep_json_is_refused() -> None:
    nested: object = 1
    for _ in range(20):
        nested = [nested]
    body = w.encode(w.Control({"op": "x", "a": nested}))
    with pytest.raises(w.WireError, match="nested deeper"):
        w.decode(body)


@pytest.mark.parametrize("extra", [0, 1])
def test_json_depth_limit_is_exact_whatever_the_brackets_in_strings(extra: int) -> None:
    """A value MAX_JSON_DEPTH levels below the body object passes; one more is refused.
    Brackets inside strings count for nothing (the walk is skipped only when the text
    has no more opening brackets than the limit)."""
    nested: object = "{[" * 20
    for _ in range(w.MAX_JSON_DEPTH - 1 + extra):
        nested = [nested]
    body = w.encode(w.Control({"op": "x", "a": nested, "b": "[[[{{{" * 10}))
    if extra:
        with pytest.raises(w.WireError, match="nested deeper"):
            w.decode(body)
    else:
        assert isinstance(w.decode(body), w.Control)
    shallow = w.encode(w.Control({"op": "x", "a": "[" * 100, "b": [[1]]}))
    assert isinstance(w.decode(shallow), w.Control)


def test_denied_is_what_y_protocols_reads() -> None:
    # y-protocols auth: [messageAuth = 2, permissionDenied = 0, varString reason]
    assert w.denied("no") == b"\x02\x00\x02no"


def test_document_names() -> None:
    assert d.parse("dir").owner is d.Owner.MARKET
    inbox = d.parse(f"in/{A.id}@3")
    assert (inbox.kind, inbox.agent, inbox.epoch, inbox.base) == (
        d.DocKind.INBOX,
        A.id,
        3,
        f"in/{A.id}",
    )
    run = d.parse(f"r/{A.id}/{TID}.2")
    assert (run.kind, run.agent, run.task, run.attempt) == (d.DocKind.RUN, A.id, TID, 2)
    assert d.parse(f"p/{A.id}/{TID}").task == TID
    for bad in [
        "",
        "dirt",
        "in/short",
        f"r/{A.id}/{TID}.0",
        f"p/{A.id}/{TID}x",
        f"a/{A.id}@01",
        f"a/{A.id}/",
    ]:
        with pytest.raises(d.DocumentError):
            d.parse(bad)


def test_owners_write_and_nobody_else() -> None:
    mine = frozenset({A.id})
    assert d.may_write(d.parse(f"a/{A.id}"), mine, lease=False)
    assert d.may_write(d.parse(f"r/{A.id}/{TID}.1"), mine, lease=False)
    assert not d.may_write(d.parse(f"a/{B.id}"), mine, lease=True)
    assert not d.may_write(d.parse(f"in/{A.id}"), mine, lease=False)  # the broker's, not A's
    assert d.may_write(d.parse(f"in/{A.id}"), mine, lease=True)
    assert not d.may_write(d.parse("dir"), mine, lease=True)


def test_read_rules() -> None:
    mine = frozenset({A.id})
    assert d.may_read(d.parse(f"in/{A.id}"), mine, broker=False, attached=False)
    assert not d.may_read(d.parse(f"in/{B.id}"), mine, broker=False, attached=False)
    assert d.may_read(d.parse(f"in/{B.id}"), mine, broker=True, attached=False)
    assert not d.may_read(d.parse(f"p/{B.id}/{TID}"), mine, broker=True, attached=False)
    assert d.may_read(d.parse(f"p/{B.id}/{TID}"), mine, broker=False, attached=True)
    assert not d.may_read(d.parse("who"), mine, broker=False, attached=False)
    assert d.may_read_prefix("a/", broker=True) and not d.may_read_prefix("a/", broker=False)
    assert not d.may_read_prefix("p/", broker=True)


def _handshake(identities: list[Identity]) -> tuple[Challenge, Response]:
    challenge = Challenge.read(w.decode(w.encode(Challenge.fresh(M.id, "room").frame())))  # type: ignore[arg-type]
    response = Response.make(challenge, identities)
    return challenge, Response.read(w.decode(w.encode(response.frame())))  # type: ignore[arg-type]


def test_handshake_proves_every_id_and_the_market() -> None:
    challenge, response = _handshake([A, B])
    t = response.check(challenge)
    welcome = Welcome.make(M, t, response.ids, {"maxMessage": 1})
    back = Welcome.read(w.decode(w.encode(welcome.frame())), challenge, t)  # type: ignore[arg-type]
    assert back.granted == [A.id, B.id]


def test_a_replayed_response_proves_nothing() -> None:
    challenge, response = _handshake([A])
    later = Challenge.fresh(M.id, "room")  # a new connection: a new nonce
    with pytest.raises(HandshakeError, match="bad signature"):
        response.check(later)
    with pytest.raises(HandshakeError, match="bad signature"):
        response.check(Challenge(M.id, "other room", challenge.nonce))


def test_a_signature_by_another_key_or_a_forged_welcome_fails() -> None:
    challenge, response = _handshake([A])
    stolen = Response([B.id], response.nonce, response.sigs)  # A's signature, B's name
    with pytest.raises(HandshakeError, match="bad signature"):
        stolen.check(challenge)
    t = response.check(challenge)
    forged = Welcome.make(A, t, [A.id], {})  # not signed by the market the challenge named
    with pytest.raises(HandshakeError, match="does not verify"):
        Welcome.read(w.decode(w.encode(forged.frame())), challenge, t)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"ids": [], "sigs": [], "nonce": "x"},
        {"ids": ["x"], "sigs": ["y", "z"], "nonce": "x"},
        {"ids": [1], "sigs": ["y"], "nonce": "x"},
        {"ids": ["a", "a"], "sigs": ["y", "y"], "nonce": "x"},
    ],
)
def test_malformed_responses_are_refused(body: dict[str, object]) -> None:
    with pytest.raises(HandshakeError):
        Response.read(w.Auth(w.AuthType.RESPONSE, body))


def test_a_session_remembers_a_bounded_number_of_unsubscribed_documents() -> None:
    """An asker unsubscribes one run per task: the names kept (to ignore an update that
    crossed the UNSUB) are bounded, the latest are kept, and a subscription again
    forgets the name."""
    from igora.v3 import session as s

    session = s.Session("ws://127.0.0.1:1/v3", A)
    runs = [f"r/{B.id}/{i:016d}.1" for i in range(3 * s.GONE_KEPT)]
    for name in runs:
        session.unsubscribe(name)
    assert list(session._gone) == runs[-s.GONE_KEPT :]  # the cap, the latest kept
    assert not session._wanted(runs[-1]) and session._wanted(runs[0])
    session.unsubscribe(runs[0])
    assert next(reversed(session._gone)) == runs[0]  # unsubscribed again: the latest
    session.subscribe(runs[0])
    assert session._wanted(runs[0]) and runs[0] not in session._gone
