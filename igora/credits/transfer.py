"""A transfer order (docs/credits.md §5): credits a sender gives to another identity.

Signed by the sender over ``"igora3-transfer" ‖ canonical JSON of the other fields``. The
``market`` field binds it to one ledger; the random ``nonce`` is its key there, so an order
replayed, to the same market or to another, moves nothing a second time.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from ..identity import BadSignature, Identity, IdentityError, b64url, public_key, unb64url, verify
from ..protocol import canonical
from .pricing import MAX_AMOUNT

LABEL = b"igora3-transfer"
VERSION = 1
NONCE = 16


class TransferError(ValueError):
    """An order that is malformed, not its sender's, or that its balance cannot pay."""


def _id(body: dict[str, Any], field: str) -> str:
    value = body.get(field)
    try:
        public_key(value if isinstance(value, str) else "")
    except IdentityError as exc:
        raise TransferError(f"transfer {field}: {exc}") from None
    return str(value)


@dataclass(frozen=True)
class TransferOrder:
    market: str
    sender: str
    to: str
    amount: int  # millicredits, > 0
    nonce: str
    date: int  # ms epoch
    sig: bytes = b""

    @classmethod
    def make(cls, sender: Identity, market: str, to: str, amount: int) -> TransferOrder:
        order = cls(
            market, sender.id, to, amount, b64url(os.urandom(NONCE)), int(time.time() * 1000)
        )
        return cls.parse({**order.fields(), "sig": b64url(sender.sign(order.message()))})

    def fields(self) -> dict[str, Any]:
        return {
            "v": VERSION,
            "market": self.market,
            "from": self.sender,
            "to": self.to,
            "amount": self.amount,
            "nonce": self.nonce,
            "date": self.date,
        }

    def message(self) -> bytes:
        return LABEL + canonical(self.fields())

    def to_json(self) -> dict[str, Any]:
        return {**self.fields(), "sig": b64url(self.sig)}

    @classmethod
    def parse(cls, body: object) -> TransferOrder:
        """An order from its JSON, every field checked but the signature."""
        if not isinstance(body, dict) or body.get("v") != VERSION:
            raise TransferError("a transfer order is a JSON object of version 1")
        amount, date, nonce, sig = (body.get(k) for k in ("amount", "date", "nonce", "sig"))
        if type(amount) is not int or not 0 < amount <= MAX_AMOUNT:
            raise TransferError(f"transfer amount {amount!r} is not a positive millicredit count")
        if type(date) is not int or date < 0:
            raise TransferError("transfer date is not a time in ms")
        try:
            unb64url(nonce if isinstance(nonce, str) else "", NONCE, "transfer nonce")
            raw = unb64url(sig if isinstance(sig, str) else "", 64, "transfer signature")
        except IdentityError as exc:
            raise TransferError(str(exc)) from None
        order = cls(
            _id(body, "market"), _id(body, "from"), _id(body, "to"), amount, str(nonce), date, raw
        )
        if order.sender == order.to:
            raise TransferError("a transfer goes to another identity than its sender")
        return order

    def verify(self) -> None:
        try:
            verify(self.sender, self.message(), self.sig)
        except BadSignature:
            raise TransferError("the transfer order is not signed by its sender") from None
