"""The secure handshake of a v3 connection (docs/security.md §3).

```
agent                                    market (key M)
  <- AUTH CHALLENGE {market: M, room, nonce: nm}
  -> AUTH RESPONSE  {ids: [A…], nonce: na, sigs: [sig_A(T)…], invite?}
  <- AUTH WELCOME   {sig: sig_M(T), granted: [A…], limits: {…}}
T = "igora3-auth" ‖ M ‖ len(room) ‖ room ‖ nm ‖ na ‖ count ‖ A1 ‖ A2 …   (keys: 32 raw bytes)
```

Replay protection is the market's fresh ``nm``: a recorded RESPONSE signs a transcript no
later connection asks for. The WELCOME's signature lets the agent check the market's key
(pinned, or trusted on first use). Byte strings travel as unpadded base64url in the JSON
bodies of the ``AUTH`` frames (``igora.v3.wire``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..identity import BadSignature, Identity, IdentityError, b64url, public_key, unb64url, verify
from ..lib0 import uint_bytes
from .wire import Auth, AuthType

LABEL = b"igora3-auth"
NONCE = 32
MAX_IDS = 64  # identities proved on one connection (a gateway's API keys)


class HandshakeError(ValueError):
    """A handshake message that proves nothing: the connection is refused (4401)."""


def transcript(
    market: str, room: str, market_nonce: bytes, agent_nonce: bytes, ids: list[str]
) -> bytes:
    """What every signature of one handshake covers (lengths fixed or prefixed, so no
    two handshakes have the same transcript)."""
    room_bytes = room.encode("utf-8")
    return b"".join(
        [
            LABEL,
            public_key(market).encode(),
            uint_bytes(len(room_bytes)),
            room_bytes,
            market_nonce,
            agent_nonce,
            uint_bytes(len(ids)),
            *(public_key(i).encode() for i in ids),
        ]
    )


def _nonce(body: dict[str, Any], field: str = "nonce") -> bytes:
    value = body.get(field)
    if not isinstance(value, str):
        raise HandshakeError(f"{field!r} missing")
    try:
        return unb64url(value, NONCE, field)
    except IdentityError as exc:
        raise HandshakeError(str(exc)) from None


def _signature(value: object) -> bytes:
    if not isinstance(value, str):
        raise HandshakeError("a signature must be a string")
    try:
        return unb64url(value, 64, "signature")
    except IdentityError as exc:
        raise HandshakeError(str(exc)) from None


@dataclass(frozen=True)
class Challenge:
    """What the market sends first; ``nonce`` is never reused or stored."""

    market: str
    room: str
    nonce: bytes

    @classmethod
    def fresh(cls, market: str, room: str) -> Challenge:
        return cls(market, room, os.urandom(NONCE))

    def frame(self) -> Auth:
        body = {"market": self.market, "room": self.room, "nonce": b64url(self.nonce), "v": 3}
        return Auth(AuthType.CHALLENGE, body)

    @classmethod
    def read(cls, frame: Auth) -> Challenge:
        """The challenge in a frame an agent received."""
        body = frame.body
        if frame.type is not AuthType.CHALLENGE or not isinstance(body, dict):
            raise HandshakeError("expected a CHALLENGE")
        market, room = body.get("market"), body.get("room")
        if not isinstance(market, str) or not isinstance(room, str):
            raise HandshakeError("a CHALLENGE names the market's key and the room")
        try:
            public_key(market)
        except IdentityError as exc:
            raise HandshakeError(f"the market's key: {exc}") from None
        return cls(market, room, _nonce(body))


@dataclass(frozen=True)
class Response:
    """The agent's proof: a signature of the transcript by each identity it speaks for."""

    ids: list[str]
    nonce: bytes
    sigs: list[bytes]
    invite: str | None = None

    @classmethod
    def make(
        cls, challenge: Challenge, identities: list[Identity], invite: str | None = None
    ) -> Response:
        nonce = os.urandom(NONCE)
        ids = [i.id for i in identities]
        t = transcript(challenge.market, challenge.room, challenge.nonce, nonce, ids)
        return cls(ids, nonce, [i.sign(t) for i in identities], invite)

    def frame(self) -> Auth:
        body: dict[str, Any] = {
            "ids": self.ids,
            "nonce": b64url(self.nonce),
            "sigs": [b64url(s) for s in self.sigs],
        }
        if self.invite is not None:
            body["invite"] = self.invite
        return Auth(AuthType.RESPONSE, body)

    @classmethod
    def read(cls, frame: Auth) -> Response:
        """The response in a frame the market received (shape only: see ``check``)."""
        body = frame.body
        if frame.type is not AuthType.RESPONSE or not isinstance(body, dict):
            raise HandshakeError("expected a RESPONSE")
        ids, sigs, invite = body.get("ids"), body.get("sigs"), body.get("invite")
        if not isinstance(ids, list) or not isinstance(sigs, list) or not ids:
            raise HandshakeError("a RESPONSE lists ids and their signatures")
        if len(ids) > MAX_IDS or len(ids) != len(sigs) or len(set(map(str, ids))) != len(ids):
            raise HandshakeError(f"a RESPONSE has 1 to {MAX_IDS} distinct ids, a signature each")
        if not all(isinstance(i, str) for i in ids):
            raise HandshakeError("an id must be a string")
        if invite is not None and not isinstance(invite, str):
            raise HandshakeError("an invitation is a string")
        return cls(list(ids), _nonce(body), [_signature(s) for s in sigs], invite)

    def check(self, challenge: Challenge) -> bytes:
        """Verify every signature against the challenge; the transcript, or
        ``HandshakeError``."""
        try:
            t = transcript(challenge.market, challenge.room, challenge.nonce, self.nonce, self.ids)
            for id_, sig in zip(self.ids, self.sigs, strict=True):
                verify(id_, t, sig)
        except (IdentityError, BadSignature) as exc:
            raise HandshakeError(str(exc)) from None
        return t


@dataclass(frozen=True)
class Welcome:
    """The market's answer: its signature of the transcript, the ids it admitted."""

    sig: bytes
    granted: list[str]
    limits: dict[str, Any]

    @classmethod
    def make(
        cls, market: Identity, t: bytes, granted: list[str], limits: dict[str, Any]
    ) -> Welcome:
        return cls(market.sign(t), granted, limits)

    def frame(self) -> Auth:
        body = {"sig": b64url(self.sig), "granted": self.granted, "limits": self.limits}
        return Auth(AuthType.WELCOME, body)

    @classmethod
    def read(cls, frame: Auth, challenge: Challenge, t: bytes) -> Welcome:
        """The welcome an agent received, its signature checked against the key the
        challenge named (the caller checks that key is the one it expects)."""
        body = frame.body
        if frame.type is not AuthType.WELCOME or not isinstance(body, dict):
            raise HandshakeError("expected a WELCOME")
        sig = _signature(body.get("sig"))
        try:
            verify(challenge.market, t, sig)
        except BadSignature:
            raise HandshakeError("the market's signature does not verify") from None
        granted, limits = body.get("granted"), body.get("limits", {})
        if not isinstance(granted, list) or not all(isinstance(g, str) for g in granted):
            raise HandshakeError("a WELCOME lists the ids granted")
        if not isinstance(limits, dict):
            raise HandshakeError("a WELCOME's limits are an object")
        return cls(sig, granted, limits)
