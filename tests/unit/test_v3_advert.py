"""Signed objects and workers' adverts of protocol 3 (igora.v3.signed, igora.v3.advert)."""

from __future__ import annotations

from typing import Any

import pytest
from nacl.signing import SigningKey
from pycrdt import Doc, Map

from igora.identity import Identity
from igora.v3 import advert, signed

W = Identity(SigningKey.generate())
OTHER = Identity(SigningKey.generate())
MODELS = [{"name": "smollm2-135m", "params": {"context": 2048}}]


def _advert(identity: Identity = W, **changes: Any) -> dict[str, Any]:
    fields = {"name": "w1", "engine": "echo", "models": MODELS, "slots": 2, **changes}
    return advert.make(identity, identity.session_key(), **fields)


def test_canonical_json_sorts_keys_drops_sig_and_writes_integral_numbers_as_integers() -> None:
    assert signed.canonical({"b": 1.0, "a": [2, {"d": 3, "c": "é"}], "sig": "x"}) == (
        '{"a":[2,{"c":"é","d":3}],"b":1}'.encode()
    )
    with pytest.raises(signed.SignatureError, match="integers only"):
        signed.canonical({"params": 0.135})  # a fraction travels as a decimal string


def test_an_advert_checks_and_survives_a_trip_through_a_yjs_map() -> None:
    made = _advert()
    assert advert.check({"op": "advert", **made}) == made
    doc: Doc[Any] = Doc()
    workers = doc.get("workers", type=Map)
    workers[W.id] = made
    assert advert.check(workers[W.id]) == made  # numbers came back as floats


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"slots": 3}, "bad signature"),  # changed after signing
        ({"slots": -1}, '"slots"'),
        ({"slots": True}, '"slots"'),
        ({"state": "asleep"}, '"state"'),
        ({"name": ""}, '"name"'),
        ({"models": [{"params": {}}]}, '"name"'),
        ({"models": "all"}, '"models"'),
        ({"since": 1}, "bad signature"),  # the session key's signature covers since
        ({"encSig": "x"}, "encSig"),
        ({"id": OTHER.id}, "bad signature"),  # another's id on my advert
        ({"sig": None}, '"sig"'),
    ],
)
def test_a_changed_or_malformed_advert_is_refused(change: dict[str, Any], reason: str) -> None:
    with pytest.raises(advert.AdvertError, match=reason):
        advert.check({**_advert(), **change})


def test_an_advert_signed_by_another_key_is_refused() -> None:
    forged = signed.sign(OTHER, signed.ADVERT, {**_advert(), "sig": ""})
    forged["id"] = W.id
    with pytest.raises(advert.AdvertError):
        advert.check(forged)
    # and a signature made for another purpose (another label) proves no advert
    other_label = signed.sign(W, b"igora3-other", {k: v for k, v in _advert().items()})
    with pytest.raises(advert.AdvertError, match="bad signature"):
        advert.check(other_label)
