"""Receipts and claims (docs/credits.md §3): every forgery the table lists gains nothing."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pycrdt import Doc, Map

from igora.credits.receipts import (
    WRITTEN,
    Claim,
    ClaimError,
    Reason,
    Receipt,
    completed,
    run_hash,
    worker_knows,
)
from igora.identity import b64url
from igora.protocol import CanonicalError, canonical
from igora.v3.header import HeaderError, header_hash, sign_header, verify_header
from igora.v3.signed import plain

from .credits_world import ASKERS, MARKET, PARAMS, WORKERS, claim, header, receipt, task_id

ASKER, OTHER_ASKER = ASKERS[0], ASKERS[1]
WORKER, OTHER_WORKER = WORKERS[0], WORKERS[1]


def refused(c: Claim, claimer: str = WORKER.id, params: str = PARAMS) -> Reason:
    with pytest.raises(ClaimError) as info:
        c.check(claimer, MARKET.id, params)
    return info.value.reason


# --- canonical JSON -----------------------------------------------------------------


def test_canonical_json_sorts_keys_without_whitespace_in_utf8() -> None:
    assert canonical({"b": 1, "a": [True, None, "é"]}) == '{"a":[true,null,"é"],"b":1}'.encode()


def test_canonical_json_sorts_keys_as_javascript_does() -> None:
    # UTF-16 code units: the astral U+1F600 (0xD83D…) sorts before U+FFFF.
    assert canonical({"\uffff": 1, "\U0001f600": 2}) == '{"\U0001f600":2,"\uffff":1}'.encode()


@pytest.mark.parametrize("value", [{"a": 1.0}, {"a": float("nan")}, {1: 2}, {"a": {1, 2}}])
def test_canonical_json_has_no_floats_and_string_keys_only(value: Any) -> None:
    with pytest.raises(CanonicalError):
        canonical(value)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=10,
)


@given(st.dictionaries(st.text(max_size=5), json_values))
def test_canonical_json_does_not_depend_on_key_order(obj: dict[str, Any]) -> None:
    assert canonical(dict(reversed(list(obj.items())))) == canonical(obj)


def _reference(value: Any) -> Any:
    """Canonical JSON's rule, spelled out: keys in UTF-16 code unit order, all the way."""
    if isinstance(value, dict):
        order = sorted(value, key=lambda k: k.encode("utf-16-be", "surrogatepass"))
        return {k: _reference(value[k]) for k in order}
    if isinstance(value, list):
        return [_reference(v) for v in value]
    return value


keys = st.text(max_size=5) | st.sampled_from(["\uffff", "\U0001f600", "\ue000", "é", "a"])
json_any = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=12,
)


@given(json_any)
def test_canonical_json_is_the_rule_spelled_out(value: Any) -> None:
    text = json.dumps(_reference(value), separators=(",", ":"), ensure_ascii=False)
    assert canonical(value) == text.encode()


def _nested(levels: int, leaf: Any, as_dict: bool) -> Any:
    for _ in range(levels):
        leaf = {"k": leaf} if as_dict else [leaf]
    return leaf


@pytest.mark.parametrize("as_dict", [False, True])
def test_canonical_json_takes_32_levels_of_nesting_not_33(as_dict: bool) -> None:
    assert canonical(_nested(32, 1, as_dict))
    assert canonical(_nested(32, [], as_dict))
    with pytest.raises(CanonicalError, match="nested deeper than 32"):
        canonical(_nested(33, 1, as_dict))
    with pytest.raises(CanonicalError, match="nested deeper than 32"):
        canonical(_nested(33, [], as_dict))


# --- headers ----------------------------------------------------------------------


def test_a_signed_header_verifies_and_any_change_breaks_it() -> None:
    head = header(ASKER, task_id(1))
    assert verify_header(head) == header_hash(head)  # the hash comes with the check
    for field, value in [("maxPrice", 10**10), ("model", "other"), ("asker", OTHER_ASKER.id)]:
        with pytest.raises(HeaderError):
            verify_header({**head, field: value})


def test_a_header_s_hash_covers_its_signature() -> None:
    head = header(ASKER, task_id(1))
    again = sign_header(ASKER, {k: v for k, v in head.items() if k not in ("sig", "asker")})
    assert header_hash(again) == header_hash(head)  # Ed25519 is deterministic
    assert header_hash({**head, "sig": b64url(bytes(64))}) != header_hash(head)


# --- claims that hold -------------------------------------------------------------


def test_a_receipt_signed_by_the_asker_settles_at_the_rule_s_price() -> None:
    s = claim(ASKER, WORKER, 1).check(WORKER.id, MARKET.id, PARAMS)
    assert (s.asker, s.worker, s.price, s.tax) == (ASKER.id, WORKER.id, 1_260, 26)
    assert s.proof["receipt"]["sig"] and s.proof["header"]["sig"] and s.proof["params"] == "0.135"


def test_a_claim_survives_its_trip_through_json() -> None:
    c = claim(ASKER, WORKER, 1)
    wire = canonical(c.to_json())
    again = Claim.parse(json.loads(wire))
    assert again == c
    assert again.check(WORKER.id, MARKET.id, PARAMS).price == 1_260


def written_through_yjs(r: Receipt) -> dict[str, Any]:
    """``r`` as its worker reads it in ``p/….receipts[n]``: written, through a Yjs map
    (every number a float), read back as signed."""
    receipts: Map[Any] = Doc().get("receipts", type=Map)
    receipts["1"] = r.written()
    return plain(receipts["1"])


def test_the_receipt_written_for_the_worker_is_what_it_does_not_know() -> None:
    head = header(ASKER, task_id(1))
    r = receipt(ASKER, WORKER, head)
    assert set(r.written()) == set(WRITTEN) == {"promptTokens", "completionTokens", "price", "sig"}
    run = run_hash([b"chunk-0", b"chunk-1"])  # the worker's own chunks: those the asker read
    whole = completed(written_through_yjs(r), worker_knows(MARKET.id, head, 1, WORKER.id, run))
    assert whole == r.to_json()
    # the header's hash given (the worker has it from its grant's check): the same receipt
    hashed = verify_header(head)
    knows = worker_knows(MARKET.id, head, 1, WORKER.id, run, hashed)
    assert completed(written_through_yjs(r), knows) == whole
    settled = Claim.parse({"header": head, "attempt": 1, "receipt": whole}).check(
        WORKER.id, MARKET.id, PARAMS
    )
    assert settled.price == 1_260
    # a whole receipt (an asker of before) is kept as written: its fields win
    others = worker_knows("", {**head, "model": "x"}, 9, OTHER_WORKER.id, "")
    assert completed(r.to_json(), others) == r.to_json()


@pytest.mark.parametrize(
    "knows",
    [
        {"market": OTHER_ASKER.id},  # another market than the asker's
        {"worker": OTHER_WORKER.id},  # another worker
        {"attempt": 2},
        {"run": run_hash([b"chunk-0", b"chunk-1", b"chunk-2"])},  # not the chunks read
    ],
)
def test_a_receipt_completed_with_what_the_asker_did_not_sign_is_refused(
    knows: dict[str, Any],
) -> None:
    head = header(ASKER, task_id(1))
    r = receipt(ASKER, WORKER, head)
    mine = {"market": MARKET.id, "attempt": 1, "worker": WORKER.id}
    mine["run"] = run_hash([b"chunk-0", b"chunk-1"])
    args = {**mine, **knows}
    knows = worker_knows(args["market"], head, args["attempt"], args["worker"], args["run"])
    whole = completed(written_through_yjs(r), knows)
    c = Claim.parse({"header": head, "attempt": args["attempt"], "receipt": whole})
    assert refused(c, claimer=args["worker"]) is Reason.RECEIPT_SIGNATURE


# --- forgeries ----------------------------------------------------------------------


def test_inflated_tokens_fail_the_asker_s_signature() -> None:
    c = claim(ASKER, WORKER, 1)
    assert c.receipt is not None
    more = dataclasses.replace(c.receipt, completion_tokens=2_000, price=(30 + 6_000) * 2)
    assert refused(dataclasses.replace(c, receipt=more)) is Reason.RECEIPT_SIGNATURE


def test_an_invented_task_fails_the_header_signature() -> None:
    # The worker writes a header in the asker's name and signs it (and the receipt) itself.
    fake = {**header(WORKER, task_id(9)), "asker": ASKER.id}
    r = receipt(WORKER, WORKER, header(WORKER, task_id(9)))
    assert refused(Claim(fake, 1, r)) is Reason.HEADER_SIGNATURE


def test_a_receipt_signed_by_someone_else_than_the_header_s_asker_fails() -> None:
    head = header(ASKER, task_id(2))
    r = receipt(OTHER_ASKER, WORKER, header(OTHER_ASKER, task_id(2)))
    assert refused(Claim(head, 1, r)) is Reason.WRONG_ASKER


def test_another_worker_s_receipt_fails() -> None:
    c = claim(ASKER, OTHER_WORKER, 3)
    assert refused(c, claimer=WORKER.id) is Reason.WRONG_WORKER


def test_a_receipt_of_another_task_or_attempt_fails() -> None:
    r = claim(ASKER, WORKER, 4).receipt
    assert refused(Claim(header(ASKER, task_id(5)), 1, r)) is Reason.MISMATCH
    assert refused(Claim(header(ASKER, task_id(4)), 2, r)) is Reason.MISMATCH


def test_a_receipt_for_another_market_fails() -> None:
    c = claim(ASKER, WORKER, 4)
    with pytest.raises(ClaimError) as info:
        c.check(WORKER.id, OTHER_ASKER.id, PARAMS)
    assert info.value.reason is Reason.MISMATCH


def test_a_price_that_is_not_the_rule_s_fails() -> None:
    # The asker signed for a 135M model; the worker claims it served a 7B one.
    assert refused(claim(ASKER, WORKER, 6), params="7") is Reason.WRONG_PRICE


def test_a_price_above_max_price_fails() -> None:
    head = header(ASKER, task_id(7), max_price=1_000)
    assert refused(Claim(head, 1, receipt(ASKER, WORKER, head))) is Reason.OVER_MAX_PRICE


def test_a_header_without_max_price_gives_no_consent_to_pay() -> None:
    head = header(ASKER, task_id(7), max_price=None)
    assert refused(Claim(head, 1, receipt(ASKER, WORKER, head))) is Reason.OVER_MAX_PRICE


def test_an_asker_signs_receipts_for_its_own_tasks_only() -> None:
    with pytest.raises(ClaimError):
        receipt(OTHER_ASKER, WORKER, header(ASKER, task_id(8)))


def test_a_claim_without_receipt_waits_for_the_delivery_record() -> None:
    c = Claim(header(ASKER, task_id(8)), 1, usage=(30, 200), run=run_hash([b"x"]))
    assert Claim.parse(c.to_json()) == c
    assert refused(c) is Reason.NO_RECEIPT


@pytest.mark.parametrize(
    "body",
    [
        None,
        {},
        {"header": {}, "attempt": 0},
        {"header": {}, "attempt": 1},
        {"header": {}, "attempt": 1, "usage": {"promptTokens": -1, "completionTokens": 0}},
        {"header": {}, "attempt": 1, "receipt": {"v": 2}},
        {"header": {}, "attempt": 1, "receipt": {"v": 1, "sig": "short"}},
    ],
)
def test_malformed_claims_are_refused_with_their_reason(body: object) -> None:
    with pytest.raises(ClaimError) as info:
        Claim.parse(body)
    assert info.value.reason is Reason.MALFORMED


@given(st.sampled_from(list(Receipt.__dataclass_fields__)), st.integers(0, 10**6))
def test_no_change_to_a_signed_receipt_goes_unseen(field: str, n: int) -> None:
    c = claim(ASKER, WORKER, 1)
    assert c.receipt is not None
    value = getattr(c.receipt, field)
    changed: object
    if isinstance(value, int):
        changed = value + 1 + n
    elif isinstance(value, bytes):
        changed = bytes(64) if n % 2 else value[::-1]
    else:
        changed = OTHER_ASKER.id if len(value) == 43 else value + "x"
    forged = dataclasses.replace(c.receipt, **{field: changed})
    with pytest.raises(ClaimError):
        dataclasses.replace(c, receipt=forged).check(WORKER.id, MARKET.id, PARAMS)


def test_a_header_survives_a_trip_through_a_yjs_map() -> None:
    h = header(ASKER, task_id(0))
    tasks: Map[Any] = Doc().get("tasks", type=Map)
    tasks[h["id"]] = h
    back = tasks[h["id"]]
    assert back["maxTokens"] == 256.0 and isinstance(back["maxTokens"], float)  # Yjs' numbers
    assert verify_header(back) == header_hash(back) == header_hash(h)
