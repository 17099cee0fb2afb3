"""A worker's advert in a v3 room (docs/protocol-v3.md §6): what it serves, signed.

A worker sends ``CONTROL {"op": "advert", …advert}`` once, and again when its models,
slots, state or session key change. The market checks it (``check``) and writes it, as
sent, into ``dir.workers[id]``; readers check it again themselves (``check``), since
the market could lie. The fields:

| field | what |
|---|---|
| ``id`` | the worker's id: one of the identities its connection proved |
| ``name``, ``engine`` | shown to people (≤ 64 characters each) |
| ``models`` | a list of ``{"name": str, …}`` (≤ 64 models), e.g. with ``params`` |
| ``slots`` | tasks it runs at once (0 to 100,000) |
| ``state`` | ``"ready"`` or ``"busy"`` (cannot take tasks now) |
| ``encKey``, ``encSig``, ``since`` | its session key, signed (``igora.identity``) |
| ``sig`` | its identity's signature of the rest (``igora.v3.signed``, label ``ADVERT``) |
"""

from __future__ import annotations

from typing import Any

from ..identity import BadSignature, Identity, IdentityError, SessionKey, verify_session_key
from . import signed

MAX_LABEL = 64
MAX_MODELS = 64
MAX_SLOTS = 100_000
MAX_BYTES = 16 * 1024  # of its canonical JSON
STATES = ("ready", "busy")


class AdvertError(ValueError):
    """An advert that is malformed or not signed by the id it names."""


def make(
    identity: Identity,
    session: SessionKey,
    *,
    name: str,
    engine: str,
    models: list[dict[str, Any]],
    slots: int,
    state: str = "ready",
) -> dict[str, Any]:
    """A signed advert (without ``op``: the ``CONTROL`` frame adds it)."""
    body = {
        "id": identity.id,
        "name": name,
        "engine": engine,
        "models": models,
        "slots": slots,
        "state": state,
        **session.fields(),
    }
    return signed.sign(identity, signed.ADVERT, body)


def _label(body: dict[str, Any], field: str) -> None:
    value = body.get(field)
    if not isinstance(value, str) or not 0 < len(value) <= MAX_LABEL:
        raise AdvertError(f'an advert\'s "{field}" is a string of 1 to {MAX_LABEL} characters')


def check(body: dict[str, Any]) -> dict[str, Any]:
    """The advert in ``body`` (a ``CONTROL`` body, or an entry of ``dir.workers``;
    ``op`` left out, integral numbers as ints), checked: shape, session key signature,
    signature; ``AdvertError`` with the reason otherwise."""
    try:
        advert: dict[str, Any] = signed.plain({k: v for k, v in body.items() if k != "op"})
    except signed.SignatureError as exc:
        raise AdvertError(str(exc)) from None
    id_ = advert.get("id")
    if not isinstance(id_, str):
        raise AdvertError('an advert names its "id"')
    _label(advert, "name")
    _label(advert, "engine")
    models = advert.get("models")
    if not isinstance(models, list) or len(models) > MAX_MODELS:
        raise AdvertError(f'an advert\'s "models" is a list of at most {MAX_MODELS}')
    for model in models:
        if not isinstance(model, dict):
            raise AdvertError('each of an advert\'s "models" is an object with a "name"')
        _label(model, "name")
    slots = advert.get("slots")
    if isinstance(slots, bool) or not isinstance(slots, int) or not 0 <= slots <= MAX_SLOTS:
        raise AdvertError(f'an advert\'s "slots" is a whole number, 0 to {MAX_SLOTS}')
    if advert.get("state") not in STATES:
        raise AdvertError(f'an advert\'s "state" is one of {", ".join(STATES)}')
    try:
        if len(signed.canonical(advert)) > MAX_BYTES:
            raise AdvertError(f"an advert of more than {MAX_BYTES} bytes")
        enc_key, enc_sig, since = advert.get("encKey"), advert.get("encSig"), advert.get("since")
        if not isinstance(enc_key, str) or not isinstance(enc_sig, str) or type(since) is not int:
            raise AdvertError('an advert carries its session key: "encKey", "encSig", "since"')
        verify_session_key(id_, enc_key, since, enc_sig)
        signed.check(id_, signed.ADVERT, advert)
    except (IdentityError, BadSignature, signed.SignatureError) as exc:
        raise AdvertError(f"advert of {id_[:8]}: {exc}") from None
    return advert
