"""End-to-end encryption of a v3 task (igora.v3.crypto, docs/security.md §6): the prompt,
grants, the answer key and the answer's chunks, and what each refuses."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.bindings import crypto_scalarmult
from nacl.public import PublicKey
from nacl.signing import SigningKey

from igora.identity import Identity, SessionKey, b64url, verify_session_key
from igora.v3 import crypto
from igora.v3.crypto import (
    AnswerReader,
    AnswerWriter,
    BadFinal,
    ChunkAfterFinal,
    ChunkAuthError,
    ChunkOrderError,
    CryptoError,
    Final,
    GrantError,
    KeyAgreementError,
    PromptError,
    TruncatedAnswer,
)
from igora.v3.header import header_hash, sign_header

ASKER = Identity(SigningKey.generate())
WORKER = Identity(SigningKey.generate())
OTHER = Identity(SigningKey.generate())  # another candidate worker
ASKER_S = ASKER.session_key()
WORKER_S = WORKER.session_key()
OTHER_S = OTHER.session_key()
TID = "T" * 15 + "1"
MARKER = "ZEBRA-MARKER-7f3a"
USAGE = {"promptTokens": 7, "completionTokens": 3}


def _header(tid: str = TID, **changes: Any) -> dict[str, Any]:
    fields = {
        "id": tid,
        "model": "smollm2-135m",
        "maxTokens": 256,
        "promptBytes": 120,
        "date": 1764460000000,
        "key": ASKER_S.fields()["encKey"],
        "candidates": [WORKER.id, OTHER.id],
        **changes,
    }
    return sign_header(ASKER, fields)


def _advert_key(identity: Identity, session: SessionKey) -> PublicKey:
    """A worker's session key as the asker takes it from its advert: checked."""
    f = session.fields()
    return verify_session_key(identity.id, str(f["encKey"]), int(f["since"]), str(f["encSig"]))


def _keys(salt: bytes, n: int = 1) -> tuple[bytes, bytes, bytes]:
    """K, the worker's K_a and the asker's K_a for run ``n`` with ``salt``."""
    k = crypto.new_task_key()
    worker_side = crypto.worker_answer_key(k, WORKER_S, ASKER_S.public_key, n, salt)
    asker_side = crypto.asker_answer_key(k, ASKER_S, _advert_key(WORKER, WORKER_S), n, salt)
    return k, worker_side, asker_side


def _run(pieces: list[str], n: int = 1) -> tuple[bytes, list[bytes]]:
    """The asker's answer key and the chunks a worker writes for ``pieces``."""
    _, ka_w, ka_c = _keys(crypto.new_salt(), n)
    writer = AnswerWriter(ka_w, TID, n)
    chunks = [writer.piece(p) for p in pieces]
    chunks.append(writer.final("".join(pieces), "stop", USAGE))
    return ka_c, chunks


# --- encoding ----------------------------------------------------------------------

short_bytes = st.binary(max_size=12)


@given(st.lists(short_bytes, max_size=4), st.lists(short_bytes, max_size=4))
def test_framed_inputs_of_different_parts_never_collide(a: list[bytes], b: list[bytes]) -> None:
    assert (crypto.frame(*a) == crypto.frame(*b)) == (a == b)


def test_derived_keys_differ_per_label_and_per_task_key() -> None:
    k = crypto.new_task_key()
    assert crypto.derive(k, b"prompt") != crypto.derive(k, b"answer")
    assert crypto.derive(k, b"ab", b"c") != crypto.derive(k, b"a", b"bc")
    assert crypto.derive(k, b"prompt") != crypto.derive(crypto.new_task_key(), b"prompt")
    with pytest.raises(CryptoError, match="32 bytes"):
        crypto.derive(b"short", b"prompt")


# --- the prompt --------------------------------------------------------------------

private = st.fixed_dictionaries(
    {"prompt": st.text(max_size=200)},
    optional={
        "systemPrompt": st.text(max_size=50),
        "temperature": st.floats(0, 2, allow_nan=False),
        "topP": st.floats(0, 1, allow_nan=False),
        "seed": st.integers(-(2**63), 2**64 - 1),
        "stop": st.lists(st.text(max_size=5), max_size=3),
    },
)


@settings(max_examples=50)
@given(private)
def test_the_private_fields_come_back_as_sealed(fields: dict[str, Any]) -> None:
    k = crypto.new_task_key()
    ct = crypto.seal_prompt(k, TID, ASKER.id, fields)
    assert crypto.open_prompt(k, TID, ASKER.id, ct) == fields


def test_a_chat_task_with_tools_and_a_format_round_trips_and_costs_40_bytes() -> None:
    fields = {
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "toolChoice": "auto",
        "responseFormat": {"type": "json_object"},
        "temperature": 0.7,
    }
    k = crypto.new_task_key()
    ct = crypto.seal_prompt(k, TID, ASKER.id, fields)
    assert crypto.open_prompt(k, TID, ASKER.id, ct) == fields
    assert len(ct) == len(crypto._json(fields, "x")) + 40  # nonce 24 + tag 16


def test_a_prompt_opens_only_under_its_key_task_and_asker() -> None:
    k = crypto.new_task_key()
    ct = crypto.seal_prompt(k, TID, ASKER.id, {"prompt": "hello"})
    flipped = ct[:30] + bytes([ct[30] ^ 1]) + ct[31:]
    for key, tid, asker, data in (
        (crypto.new_task_key(), TID, ASKER.id, ct),
        (k, "U" * 16, ASKER.id, ct),  # moved to another task
        (k, TID, OTHER.id, ct),  # claimed by another asker
        (k, TID, ASKER.id, flipped),
    ):
        with pytest.raises(PromptError, match="does not open"):
            crypto.open_prompt(key, tid, asker, data)
    with pytest.raises(PromptError, match="too short"):
        crypto.open_prompt(k, TID, ASKER.id, ct[:39])


def test_sealing_refuses_fields_that_are_not_private_or_not_json() -> None:
    k = crypto.new_task_key()
    with pytest.raises(CryptoError, match=r"not private task fields .*: model"):
        crypto.seal_prompt(k, TID, ASKER.id, {"prompt": "x", "model": "m"})
    with pytest.raises(CryptoError, match="not JSON"):
        crypto.seal_prompt(k, TID, ASKER.id, {"temperature": float("nan")})


def test_the_private_part_of_a_task_leaves_what_the_header_says() -> None:
    task = {"model": "m", "maxTokens": 9, "prompt": "p", "temperature": 0.5, "kind": "chat"}
    assert crypto.private_part(task) == {"prompt": "p", "temperature": 0.5, "kind": "chat"}


def test_a_prompt_that_opens_but_is_not_an_object_is_refused() -> None:
    k = crypto.new_task_key()
    nonce = bytes(24)
    ad = crypto._prompt_ad(TID, ASKER.id)
    ct = nonce + crypto._aead_seal(crypto.derive(k, crypto.PROMPT_KEY), nonce, ad, b"[1]")
    with pytest.raises(PromptError, match="not a JSON object"):
        crypto.open_prompt(k, TID, ASKER.id, ct)


# --- grants ------------------------------------------------------------------------


def test_a_grant_opens_for_its_worker_and_is_128_bytes() -> None:
    k = crypto.new_task_key()
    header = _header()
    grant = crypto.seal_grant(k, header, _advert_key(WORKER, WORKER_S))
    assert len(grant) == 128
    # with the header's hash, as checked: the receipt's ``header`` (no second hashing)
    assert crypto.open_grant(WORKER_S, grant, header) == (k, header_hash(header))


def test_grants_to_several_workers_each_open_for_its_own_only() -> None:
    k = crypto.new_task_key()
    header = _header()
    grants = crypto.seal_grants(k, header, {"w": WORKER_S.public_key, "o": OTHER_S.public_key})
    assert crypto.open_grant(WORKER_S, grants["w"], header).key == k
    assert crypto.open_grant(OTHER_S, grants["o"], header).key == k
    with pytest.raises(GrantError, match="sealed to another worker"):
        crypto.open_grant(OTHER_S, grants["w"], header)
    assert crypto.seal_grants(k, header, {}) == {}


def test_a_grant_sealed_to_one_worker_does_not_open_for_another() -> None:
    header = _header()
    grant = crypto.seal_grant(crypto.new_task_key(), header, WORKER_S.public_key)
    with pytest.raises(GrantError, match="sealed to another worker"):
        crypto.open_grant(OTHER_S, grant, header)
    # nor for the same worker after a restart (a new session key)
    with pytest.raises(GrantError, match="sealed to another worker"):
        crypto.open_grant(WORKER.session_key(), grant, header)


def test_a_grant_moved_to_another_task_or_header_is_refused() -> None:
    header = _header()
    grant = crypto.seal_grant(crypto.new_task_key(), header, WORKER_S.public_key)
    with pytest.raises(GrantError, match=f"for task 'TTTTTTTTTTTTTTT1', not for task {'U' * 16}"):
        crypto.open_grant(WORKER_S, grant, _header("U" * 16))
    with pytest.raises(GrantError, match="another header of that task"):
        crypto.open_grant(WORKER_S, grant, _header(maxTokens=4096))


def test_a_grant_with_a_header_not_signed_by_its_asker_is_refused() -> None:
    header = _header()
    grant = crypto.seal_grant(crypto.new_task_key(), header, WORKER_S.public_key)
    forged = {**header, "maxTokens": 4096}  # signature no longer holds
    with pytest.raises(GrantError, match=r"grant refused: header of task .*bad signature"):
        crypto.open_grant(WORKER_S, grant, forged)
    flipped = grant[:60] + bytes([grant[60] ^ 4]) + grant[61:]
    with pytest.raises(GrantError, match="or altered"):
        crypto.open_grant(WORKER_S, flipped, header)


# --- the answer key ------------------------------------------------------------------


def test_asker_and_worker_derive_the_same_answer_key_and_nobody_else_does() -> None:
    salt = crypto.new_salt()
    k, ka_w, ka_c = _keys(salt)
    assert ka_w == ka_c
    # another candidate worker holds K (it was granted too) but not the DH secret
    ka_other = crypto.worker_answer_key(k, OTHER_S, ASKER_S.public_key, 1, salt)
    assert ka_other != ka_w
    # the asker, reading the run of the worker it was told, uses that worker's key
    assert crypto.asker_answer_key(k, ASKER_S, OTHER_S.public_key, 1, salt) == ka_other != ka_c
    # other attempt, other salt, other task key: other answer keys
    assert crypto.worker_answer_key(k, WORKER_S, ASKER_S.public_key, 2, salt) != ka_w
    other_salt = crypto.new_salt()
    assert crypto.worker_answer_key(k, WORKER_S, ASKER_S.public_key, 1, other_salt) != ka_w
    k2 = crypto.new_task_key()
    assert crypto.worker_answer_key(k2, WORKER_S, ASKER_S.public_key, 1, salt) != ka_w


def test_a_candidate_holding_the_task_key_and_every_public_value_lacks_the_answer_key() -> None:
    salt = crypto.new_salt()
    k, ka, _ = _keys(salt)
    asker_pk, worker_pk = bytes(ASKER_S.public_key), bytes(WORKER_S.public_key)
    own_dh = [crypto_scalarmult(bytes(OTHER_S.private_key), pk) for pk in (asker_pk, worker_pk)]
    guesses = [[], [bytes(32)], *([s] for s in own_dh)]  # no secret, zeros, its own DH
    for guess in guesses:
        attempt = crypto.derive(
            k, crypto.ANSWER_KEY, *guess, asker_pk, worker_pk, crypto.u64(1), salt
        )
        assert attempt != ka


def test_a_candidate_holding_the_task_key_cannot_forge_chunks_of_another_workers_run() -> None:
    salt = crypto.new_salt()
    k, _, ka_c = _keys(salt)
    ka_other = crypto.worker_answer_key(k, OTHER_S, ASKER_S.public_key, 1, salt)
    forged = AnswerWriter(ka_other, TID, 1).piece("I am the worker")
    with pytest.raises(ChunkAuthError, match="another worker, run or attempt"):
        AnswerReader(ka_c, TID, 1).feed(forged)


def test_a_low_order_session_key_gives_a_typed_error() -> None:
    with pytest.raises(KeyAgreementError, match="no shared secret"):
        crypto.worker_answer_key(
            crypto.new_task_key(), WORKER_S, PublicKey(bytes(32)), 1, crypto.new_salt()
        )
    with pytest.raises(CryptoError, match="16 bytes"):
        crypto.worker_answer_key(crypto.new_task_key(), WORKER_S, ASKER_S.public_key, 1, b"s")


# --- chunks ------------------------------------------------------------------------


@settings(max_examples=30)
@given(st.lists(st.text(max_size=30), max_size=20))
def test_an_answer_reads_back_piece_by_piece_then_its_final(pieces: list[str]) -> None:
    ka, chunks = _run(pieces)
    reader = AnswerReader(ka, TID, 1)
    got = [reader.feed(c) for c in chunks]
    assert got[:-1] == pieces
    assert reader.end() == got[-1] == Final("".join(pieces), "stop", USAGE, {})
    assert [len(c) for c in chunks[:-1]] == [len(p.encode()) + 16 for p in pieces]


def test_each_chunk_has_its_own_nonce_so_equal_pieces_encrypt_differently() -> None:
    _, chunks = _run(["same piece", "same piece"])
    assert chunks[0][:-16] != chunks[1][:-16]  # the stream cipher's output, tag aside


def test_a_reader_that_reconnects_opens_from_any_index() -> None:
    pieces = ["a", "bc", "d", "ef"]
    ka, chunks = _run(pieces)
    for start in range(len(chunks)):
        reader = AnswerReader(ka, TID, 1, start)
        got = [reader.feed(c) for c in chunks[start:]]
        assert got[:-1] == pieces[start:]
        assert reader.end().text == "abcdef"


def test_the_final_chunk_carries_the_v2_results_asked_for() -> None:
    _, ka_w, ka_c = _keys(crypto.new_salt())
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    chunk = AnswerWriter(ka_w, TID, 1).final("", "tool_calls", USAGE, toolCalls=calls)
    final = AnswerReader(ka_c, TID, 1).feed(chunk)
    assert final == Final("", "tool_calls", USAGE, {"toolCalls": calls})
    with pytest.raises(CryptoError, match="not answer fields: secret"):
        AnswerWriter(ka_w, TID, 1).final("", "stop", USAGE, secret=1)


def test_reordered_repeated_and_skipped_chunks_name_the_indices() -> None:
    ka, chunks = _run(["a", "b", "c", "d"])
    reader = AnswerReader(ka, TID, 1)
    reader.feed(chunks[0])
    with pytest.raises(
        ChunkOrderError, match=r"chunk 2 arrived where chunk 1 belongs \(after a gap"
    ) as gap:
        reader.feed(chunks[2])
    assert (gap.value.expected, gap.value.found) == (1, 2)
    with pytest.raises(ChunkOrderError, match=r"chunk 0 arrived where chunk 1 belongs \(repeated"):
        reader.feed(chunks[0])
    with pytest.raises(ChunkOrderError, match="chunk 4 arrived where chunk 1"):  # the final
        reader.feed(chunks[4])
    assert reader.feed(chunks[1]) == "b"  # a refused chunk changed nothing


@settings(max_examples=40)
@given(st.permutations(range(6)))
def test_any_reordering_fails_at_the_first_chunk_out_of_place(order: list[int]) -> None:
    ka, chunks = _run(["a", "b", "c", "d", "e"])
    reader = AnswerReader(ka, TID, 1)
    for place, index in enumerate(order):
        if index != place:
            with pytest.raises(ChunkOrderError) as refused:
                reader.feed(chunks[index])
            assert (refused.value.expected, refused.value.found) == (place, index)
            return
        reader.feed(chunks[index])
    assert reader.end().text == "abcde"


def test_a_dropped_final_chunk_is_a_truncated_answer() -> None:
    ka, chunks = _run(["a", "b"])
    reader = AnswerReader(ka, TID, 1)
    for c in chunks[:-1]:
        reader.feed(c)
    with pytest.raises(TruncatedAnswer, match=f"run {TID}.1 ended after 2 chunks without a final"):
        reader.end()


def test_a_flipped_bit_anywhere_fails_as_unauthentic() -> None:
    ka, chunks = _run(["hello world"])
    for pos in range(len(chunks[0])):
        altered = bytearray(chunks[0])
        altered[pos] ^= 0x80
        with pytest.raises(ChunkAuthError, match="chunk 0 does not open"):
            AnswerReader(ka, TID, 1).feed(bytes(altered))
    with pytest.raises(ChunkAuthError):
        AnswerReader(ka, TID, 1).feed(b"short")


def test_a_chunk_from_another_run_of_the_same_task_and_worker_fails() -> None:
    k = crypto.new_task_key()
    salt = crypto.new_salt()
    ka = crypto.asker_answer_key(k, ASKER_S, WORKER_S.public_key, 1, salt)
    for n, run_salt in ((1, crypto.new_salt()), (2, salt)):  # another salt; another attempt
        other = crypto.worker_answer_key(k, WORKER_S, ASKER_S.public_key, n, run_salt)
        chunk = AnswerWriter(other, TID, n).piece("stale")
        with pytest.raises(ChunkAuthError):
            AnswerReader(ka, TID, 1).feed(chunk)
    # the same key read as another run or task: the AD differs
    chunk = AnswerWriter(ka, TID, 1).piece("x")
    with pytest.raises(ChunkAuthError):
        AnswerReader(ka, TID, 2).feed(chunk)
    with pytest.raises(ChunkAuthError):
        AnswerReader(ka, "U" * 16, 1).feed(chunk)


def test_nothing_after_the_final_chunk() -> None:
    ka, chunks = _run(["a"])
    reader = AnswerReader(ka, TID, 1)
    for c in chunks:
        reader.feed(c)
    with pytest.raises(ChunkAfterFinal, match="after the final one"):
        reader.feed(chunks[0])
    writer = AnswerWriter(ka, TID, 1)
    writer.final("", "stop", USAGE)
    with pytest.raises(CryptoError, match="already has its final chunk"):
        writer.piece("more")


@pytest.mark.parametrize(
    "plaintext, reason",
    [
        (b"not json", "not JSON"),
        (b"[]", "not a JSON object"),
        (b'{"text": "x", "usage": {}}', "no text or finishReason"),
        (b'{"text": "x", "finishReason": "stop", "usage": {"completionTokens": -1}}', "usage"),
        (b'{"text": "x", "finishReason": "stop", "usage": {"c": 1.5}}', "usage"),
    ],
)
def test_a_final_chunk_that_is_not_an_answer_is_refused(plaintext: bytes, reason: str) -> None:
    _, ka_w, ka_c = _keys(crypto.new_salt())
    chunk = crypto.seal_chunk(ka_w, TID, 1, 0, plaintext, final=True)
    with pytest.raises(BadFinal, match=reason):
        AnswerReader(ka_c, TID, 1).feed(chunk)


# --- what the market holds ------------------------------------------------------------


def test_a_marker_in_the_prompt_and_answer_is_in_no_byte_the_market_sees() -> None:
    k = crypto.new_task_key()
    header = _header()
    ct = crypto.seal_prompt(k, TID, ASKER.id, {"systemPrompt": MARKER, "prompt": MARKER * 3})
    grants = [
        crypto.seal_grant(k, header, key) for key in (WORKER_S.public_key, OTHER_S.public_key)
    ]
    salt = crypto.new_salt()
    writer = AnswerWriter(
        crypto.worker_answer_key(k, WORKER_S, ASKER_S.public_key, 1, salt), TID, 1
    )
    chunks = [writer.piece(MARKER[:i]) for i in range(1, len(MARKER) + 1)]
    chunks.append(writer.final(MARKER, "stop", USAGE))
    seen = b"".join([ct, *grants, *chunks])
    for form in (MARKER.encode(), MARKER[:8].encode(), b64url(MARKER.encode()).encode()):
        assert form not in seen
    assert MARKER.encode() in crypto._json({"prompt": MARKER}, "x")  # the probe can find it
