"""Who may join a secure market: members, bans and invitations (docs/security.md §5).

A secure market admits, after the handshake proved an id (``igora.market.v3.connection``):

- ``open``: any id that is not banned;
- ``list`` (the default of ``--secure``): the ids of the ``members`` table, and the
  market's own;
- ``invite``: ``list``, plus an id whose ``RESPONSE`` carries an invitation the market
  signed, not expired, with a use left: the use is taken and the id added to ``members``
  in one SQLite transaction.

A banned id (table ``bans``) is refused in every mode. The tables live in the market's
store (``DATA/market.sqlite3``); ``igora market members|ban|unban|invite`` write them
from another process, and the running market reads them again every ``REFRESH`` seconds
and closes the connections of the ids no longer admitted (``Membership.expelled``), and
before refusing an id that is no member (``REREAD``).

An invitation is ``igora-invite:`` and the base64url of ``payload ‖ sig``: ``payload`` the
canonical JSON of ``{"v": 1, "market": M, "nonce": 16 random bytes, "exp": ms, "uses":
n}``, ``sig`` the market's Ed25519 signature of ``"igora3-invite" ‖ payload``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass

from ..identity import BadSignature, Identity, IdentityError, b64url, public_key, verify
from ..protocol.canonical import canonical
from .store import Store

MODES = ("open", "list", "invite")
REFRESH = 1.0
"""Seconds between two reads of ``members`` and ``bans`` by a running market."""
REREAD = 0.2
"""Seconds after a read past which a handshake of an id that is no member reads the tables
again before refusing it (a member added a moment ago; at most five reads a second)."""
PREFIX = "igora-invite:"
LABEL = b"igora3-invite"
NONCE = 16
MAX_CODE = 1024  # characters of an invitation a market reads
NOT_MEMBER = "not a member of this market: ask its operator for an invitation"
NO_INVITES = "not a member of this market, which takes no invitations: ask its operator"
REMOVED = "no longer a member of this market"


class InviteError(ValueError):
    """An invitation that admits nobody; its text is the reason the agent is given."""


@dataclass(frozen=True)
class Invite:
    """What an invitation says: whose market, its nonce (its key in ``invites``), its
    expiry (ms since the epoch) and how many ids it admits."""

    market: str
    nonce: str
    exp: int
    uses: int

    def payload(self) -> bytes:
        body = {"v": 1, "market": self.market, "nonce": self.nonce, "exp": self.exp}
        return canonical({**body, "uses": self.uses})


def make_invite(
    market: Identity, uses: int, ttl: float, now: float | None = None
) -> tuple[Invite, str]:
    """A new invitation of ``market`` for ``uses`` ids, valid ``ttl`` seconds; its code."""
    now = time.time() if now is None else now
    invite = Invite(market.id, b64url(os.urandom(NONCE)), int((now + ttl) * 1000), uses)
    payload = invite.payload()
    code = base64.urlsafe_b64encode(payload + market.sign(LABEL + payload)).rstrip(b"=")
    return invite, PREFIX + code.decode("ascii")


def read_invite(code: str, market: str, now: float | None = None) -> Invite:
    """The invitation ``code`` if ``market`` signed it and it has not expired;
    ``InviteError`` with the reason else (its uses are the store's to count)."""
    if not code.startswith(PREFIX) or len(code) > MAX_CODE:
        raise InviteError(f"not an invitation (they start with {PREFIX})")
    text = code[len(PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        payload, sig = raw[:-64], raw[-64:]
        body = json.loads(payload)
    except (binascii.Error, ValueError):
        raise InviteError("not an invitation (damaged: copy it whole)") from None
    if not isinstance(body, dict) or body.get("v") != 1:
        raise InviteError("not an invitation of this version")
    try:
        invite = Invite(body["market"], body["nonce"], body["exp"], body["uses"])
        ok = (
            all(isinstance(v, str) for v in (invite.market, invite.nonce))
            and all(type(v) is int for v in (invite.exp, invite.uses))
            and invite.payload() == payload
        )
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise InviteError("not an invitation (damaged: copy it whole)")
    if invite.market != market:
        raise InviteError("invitation not this market's")
    try:
        public_key(market)
        verify(market, LABEL + payload, sig)
    except (IdentityError, BadSignature):
        raise InviteError("invitation not this market's") from None
    if invite.exp <= (time.time() if now is None else now) * 1000:
        raise InviteError("invitation expired")
    return invite


class Membership:
    """A running market's view of ``members`` and ``bans``, read again every
    ``REFRESH`` seconds (``refresh``), and its admission rule."""

    def __init__(self, store: Store, mode: str, market: str) -> None:
        if mode not in MODES:
            raise ValueError(f"membership mode {mode!r}: one of {', '.join(MODES)}")
        self.store = store
        self.mode = mode
        self.market = market
        self.members: dict[str, str] = {}
        self.bans: dict[str, str] = {}
        self.read_at = 0.0
        self.refresh()

    @property
    def members_only(self) -> bool:
        """Whether only members (and the market) are admitted: then a room's view is for
        them alone (security.md §5)."""
        return self.mode != "open"

    def refresh(self) -> None:
        """Read both tables again (blocking: run it in a thread)."""
        self.members, self.bans = self.store.members(), self.store.bans()
        self.read_at = time.monotonic()

    def expelled(self, ids: Iterable[str]) -> str | None:
        """Why a connection that proved ``ids`` may no longer stay, if it may not."""
        for id_ in sorted(ids):
            if id_ in self.bans:
                return banned(self.bans[id_])
            if self.members_only and id_ != self.market and id_ not in self.members:
                return REMOVED
        return None

    async def admit(self, ids: list[str], code: str | None) -> tuple[list[str], str | None]:
        """The ids admitted, and the reason for the first one refused (if any). An
        invitation admits ids that are not members while it has uses left."""
        admitted: list[str] = []
        refusal: str | None = None
        invite: Invite | None = None
        strangers = self.members_only and any(
            i != self.market and i not in self.members for i in ids
        )
        if strangers and time.monotonic() - self.read_at >= REREAD:
            # Perhaps added since the last read (igora market members add, then the
            # member joins at once): read again rather than refuse for good.
            await asyncio.to_thread(self.refresh)
        for id_ in ids:
            why: str | None = None
            if id_ in self.bans:
                why = banned(self.bans[id_])
            elif not self.members_only or id_ == self.market or id_ in self.members:
                pass
            elif code is None:
                why = NOT_MEMBER
            elif self.mode != "invite":
                why = NO_INVITES
            else:
                try:
                    invite = invite or read_invite(code, self.market)
                    note = f"invitation {invite.nonce}"
                    if not await asyncio.to_thread(
                        self.store.use_invite, invite.nonce, invite.uses, invite.exp, id_, note
                    ):
                        raise InviteError("invitation used up")
                    self.members[id_] = note
                except InviteError as exc:
                    why = str(exc)
            if why is None:
                admitted.append(id_)
            elif refusal is None:
                refusal = why
        return admitted, refusal


def banned(reason: str) -> str:
    return f"banned: {reason}" if reason else "banned"
