"""A ledger's entries, their hash chain, and the audit that rechecks them from their
proofs (docs/credits.md §2): what anyone given the entries can verify without the
market's word."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from enum import Enum
from typing import Any

from ..errors import IgoraError
from ..identity import b64url
from ..protocol import canonical
from .receipts import Claim, ClaimError, Delivery, Receipt, Settlement
from .transfer import TransferError, TransferOrder

TAX_ACCOUNT = "tax"
"""Where burned tax is recorded; no sum of balances counts it."""
GENESIS = bytes(32)
"""The ``prev`` of the first entry."""


class LedgerError(IgoraError):
    """The ledger file cannot be used, or its chain or balances do not add up."""


class Kind(str, Enum):
    GRANT = "grant"
    EARN = "earn"
    SPEND = "spend"
    TRANSFER = "transfer"
    TAX = "tax"


@dataclass(frozen=True)
class Entry:
    seq: int
    key: str
    kind: Kind
    account: str
    amount: int
    task: str | None
    attempt: int | None
    proof: str  # canonical JSON
    prev: bytes
    at: int  # ms epoch

    def digest(self) -> bytes:
        """BLAKE2b-256 of the entry: the next entry's ``prev``."""
        fields = {
            "seq": self.seq,
            "key": self.key,
            "kind": self.kind.value,
            "account": self.account,
            "amount": self.amount,
            "task": self.task,
            "attempt": self.attempt,
            "proof": self.proof,
            "prev": b64url(self.prev),
            "at": self.at,
        }
        return hashlib.blake2b(canonical(fields), digest_size=32).digest()

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "kind": self.kind.value,
            "account": self.account,
            "amount": self.amount,
            "task": self.task,
            "attempt": self.attempt,
            "at": self.at,
        }


def grant_key(account: str) -> str:
    """An identity is granted once in its life."""
    return f"grant:{account}"


def transfer_key(order: TransferOrder, side: str) -> str:
    """``side``: ``out`` (the sender's entry) or ``in``; an order counts once."""
    return f"transfer:{order.sender}:{order.nonce}:{side}"


def run_key(s: Settlement, kind: Kind) -> str:
    """The unique key of one of a run's entries: a run settles once."""
    return f"run:{s.asker}:{s.task}:{s.attempt}:{kind.value}"


def proof_text(obj: dict[str, Any]) -> str:
    return canonical(obj).decode("utf-8")


def audit(entries: list[Entry], balances: dict[str, int], market: str) -> None:
    """Return if the entries of ``market``'s ledger hold: the hash chain unbroken from
    ``seq`` 1, every proof's signatures and amounts, ``balances`` equal to the entries'
    sums, and their total equal to grants minus tax; LedgerError naming what does not."""
    prev = GENESIS
    for i, entry in enumerate(entries, start=1):
        if entry.seq != i or entry.prev != prev:
            raise LedgerError(f"ledger chain broken at entry {entry.seq}")
        prev = entry.digest()
    sums = dict[str, int]()
    for entry in entries:
        _check_proof(entry, market)
        sums[entry.account] = sums.get(entry.account, 0) + entry.amount
    if sums != balances:
        raise LedgerError("ledger balances differ from the sums of its entries")
    grants = sum(e.amount for e in entries if e.kind is Kind.GRANT)
    held = sum(v for a, v in sums.items() if a != TAX_ACCOUNT)
    if held != grants - sums.get(TAX_ACCOUNT, 0):
        raise LedgerError("ledger balances do not add up to grants minus tax")


def _settlement(proof: dict[str, Any], market: str) -> Settlement:
    """The settlement a run's proof makes, all its checks redone."""
    if "receipt" in proof:
        receipt = Receipt.parse(proof["receipt"])
        claim = Claim(proof["header"], receipt.attempt, receipt)
        return claim.check(receipt.worker, market, proof["params"])
    usage = proof["usage"]
    claim = Claim.parse(
        {
            "header": proof["header"],
            "attempt": proof["attempt"],
            "usage": usage,
            "run": proof["run"],
        }
    )
    delivery = Delivery.parse(proof["delivery"])
    return claim.check(proof["worker"], market, proof["params"], delivery)


def _check_proof(entry: Entry, market: str) -> None:
    """An entry's amount is what its signed proof says (LedgerError naming the entry)."""
    try:
        proof = json.loads(entry.proof)
        kind = entry.kind
        if kind is Kind.GRANT:
            ok = proof == {"grant": entry.amount, "to": entry.account}
            ok = ok and entry.key == grant_key(entry.account)
        elif kind is Kind.TRANSFER:
            order = TransferOrder.parse(proof)
            order.verify()
            side = entry.key.rsplit(":", 1)[-1]
            account, amount = (
                (order.sender, -order.amount) if side == "out" else (order.to, order.amount)
            )
            ok = order.market == market and (entry.account, entry.amount) == (account, amount)
            ok = ok and entry.key == transfer_key(order, side)
        else:
            s = _settlement(proof, market)
            due = {
                Kind.SPEND: (s.asker, -s.price),
                Kind.EARN: (s.worker, s.price - s.tax),
                Kind.TAX: (TAX_ACCOUNT, s.tax),
            }[kind]
            ok = (entry.key, entry.account, entry.amount, entry.task, entry.attempt) == (
                run_key(s, kind),
                *due,
                s.task,
                s.attempt,
            )
    except (ValueError, KeyError, TypeError, ClaimError, TransferError) as exc:
        raise LedgerError(f"ledger entry {entry.seq}: its proof does not hold ({exc})") from None
    if not ok:
        raise LedgerError(f"ledger entry {entry.seq}: its amount is not its proof's")
