"""Receipts and claims (docs/credits.md §3): how a run becomes a payment nobody can forge.

The asker signs a **receipt** for what it received (task, attempt, worker, model, its
token counts, the header's and the run's hashes, the price). The worker presents it in a
**claim** with the asker's signed header. ``Claim.check`` accepts a claim only when both
signatures check, the receipt's asker is the header's, the claimer is the receipt's
worker, task, attempt, header, model and market match, and the price is the rule's and
within the header's ``maxPrice``; it returns the ``Settlement`` the ledger records.

A worker cannot inflate the tokens (they are inside the asker's signature), invent a
task (it needs a header the asker signed), or cash another worker's receipt (the claimer
must be the receipt's worker); replaying a receipt is stopped by the ledger's unique key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from ..identity import BadSignature, Identity, IdentityError, b64url, public_key, unb64url, verify
from ..lib0 import uint_bytes
from ..protocol import CanonicalError, canonical
from ..v3.header import HeaderError, header_hash, verify_header
from . import pricing

RECEIPT_LABEL = b"igora3-receipt"
RECEIPT_VERSION = 1
MAX_COUNT = 2**53 - 1  # what a JavaScript number holds exactly
WRITTEN = ("promptTokens", "completionTokens", "price", "sig")
"""The fields of a receipt its asker writes for the worker (``Receipt.written``): the
others are the worker's to put back (``worker_knows``)."""


class Reason(Enum):
    """Why a claim is refused; the CONTROL reply names it (step 7)."""

    MALFORMED = "malformed"
    HEADER_SIGNATURE = "header_signature"
    RECEIPT_SIGNATURE = "receipt_signature"
    WRONG_ASKER = "wrong_asker"
    WRONG_WORKER = "wrong_worker"
    MISMATCH = "mismatch"
    WRONG_PRICE = "wrong_price"
    OVER_MAX_PRICE = "over_max_price"
    NO_RECEIPT = "no_receipt"
    NOT_PAYABLE = "not_payable"


class ClaimError(ValueError):
    """A receipt or claim the ledger refuses; ``reason`` says which check failed."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _count(body: dict[str, Any], field: str, least: int = 0) -> int:
    value = body.get(field)
    if type(value) is not int or not least <= value <= MAX_COUNT:
        raise ClaimError(Reason.MALFORMED, f"{field} {value!r} is not a whole number >= {least}")
    return value


def _text(body: dict[str, Any], field: str) -> str:
    value = body.get(field)
    if not isinstance(value, str) or not value or len(value) > 200:
        raise ClaimError(Reason.MALFORMED, f"{field} is missing or not a short string")
    return value


def _agent(body: dict[str, Any], field: str) -> str:
    value = _text(body, field)
    try:
        public_key(value)
    except IdentityError as exc:
        raise ClaimError(Reason.MALFORMED, f"{field}: {exc}") from None
    return value


def _hash(body: dict[str, Any], field: str) -> str:
    value = _text(body, field)
    try:
        unb64url(value, 32, field)
    except IdentityError as exc:
        raise ClaimError(Reason.MALFORMED, str(exc)) from None
    return value


class RunHash:
    """``run_hash`` of the chunks given so far, one at a time: the asker hashes each
    chunk as it opens it, rather than read the whole run again for its receipt."""

    def __init__(self) -> None:
        self._h = hashlib.blake2b(digest_size=32)

    def update(self, chunk: bytes) -> None:
        self._h.update(uint_bytes(len(chunk)))
        self._h.update(chunk)

    def value(self) -> str:
        return b64url(self._h.digest())


def run_hash(chunks: Iterable[bytes]) -> str:
    """BLAKE2b-256 over a run's chunks in order, each prefixed by its length (so no two
    lists of chunks hash alike), in base64url: the receipt's ``run``."""
    h = RunHash()
    for chunk in chunks:
        h.update(chunk)
    return h.value()


def _message(fields: dict[str, Any]) -> bytes:
    """What an asker signs: a receipt's fields without ``sig``, labelled."""
    return RECEIPT_LABEL + canonical(fields)


def worker_knows(
    market: str,
    header: dict[str, Any],
    attempt: int,
    worker: str,
    run: str,
    hashed: str | None = None,
) -> dict[str, Any]:
    """The fields of a receipt that its worker knows without it: its market, run and
    attempt, and what the signed header of the task says (``hashed``: its
    ``header_hash``, when the caller has it already)."""
    return {
        "v": RECEIPT_VERSION,
        "market": market,
        "task": str(header.get("id")),
        "attempt": attempt,
        "asker": str(header.get("asker")),
        "worker": worker,
        "model": str(header.get("model")),
        "header": header_hash(header) if hashed is None else hashed,
        "run": run,
    }


def completed(written: dict[str, Any], knows: dict[str, Any]) -> dict[str, Any]:
    """The whole receipt a worker claims with: what its asker wrote (``Receipt.written``,
    or a whole receipt, as an asker of before wrote: a field written wins) over what the
    worker ``knows`` of the run (``worker_knows``). Nothing is checked here: a receipt
    completed wrongly fails the market's signature check, as a forged one does."""
    return {**knows, **written}


@dataclass(frozen=True)
class Receipt:
    """What an asker signs for one run it received."""

    market: str
    task: str
    attempt: int
    asker: str
    worker: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    header: str  # header_hash of the signed header
    run: str  # run_hash of the chunks received
    price: int  # millicredits
    sig: bytes = b""

    @classmethod
    def make(
        cls,
        asker: Identity,
        market: str,
        header: dict[str, Any],
        attempt: int,
        worker: str,
        prompt_tokens: int,
        completion_tokens: int,
        run: str,
        params: float | int | str,
        hashed: str | None = None,
    ) -> Receipt:
        """The receipt ``asker`` signs for run ``attempt`` of the task of ``header``,
        priced by the rule for the worker's advertised ``params`` (``hashed``: the
        header's ``header_hash``, when the asker kept it)."""
        if header.get("asker") != asker.id:
            raise ClaimError(Reason.WRONG_ASKER, "an asker signs receipts for its own tasks")
        fields = {
            **worker_knows(market, header, attempt, worker, run, hashed),
            "promptTokens": prompt_tokens,
            "completionTokens": completion_tokens,
            "price": pricing.price(prompt_tokens, completion_tokens, params),
        }
        sig = asker.sign(_message(fields))
        return cls.parse({**fields, "sig": b64url(sig)})

    def fields(self) -> dict[str, Any]:
        """The signed fields, without ``sig``."""
        return {
            "v": RECEIPT_VERSION,
            "market": self.market,
            "task": self.task,
            "attempt": self.attempt,
            "asker": self.asker,
            "worker": self.worker,
            "model": self.model,
            "promptTokens": self.prompt_tokens,
            "completionTokens": self.completion_tokens,
            "header": self.header,
            "run": self.run,
            "price": self.price,
        }

    def message(self) -> bytes:
        return _message(self.fields())

    def to_json(self) -> dict[str, Any]:
        return {**self.fields(), "sig": b64url(self.sig)}

    def written(self) -> dict[str, Any]:
        """What the asker writes in ``p/….receipts[n]`` for the worker: the receipt
        without the fields the worker knows already (``worker_knows``), i.e. the token
        counts, the price and the signature (``WRITTEN``); the worker puts the rest back
        (``completed``) before it claims. The whole receipt was ~540 B per task on the
        worker's socket, two thirds of it hashes and ids it had."""
        whole = self.to_json()
        return {k: whole[k] for k in WRITTEN}

    @classmethod
    def parse(cls, body: object) -> Receipt:
        """A receipt from its JSON, every field's type checked (not its signature)."""
        if not isinstance(body, dict):
            raise ClaimError(Reason.MALFORMED, "a receipt is a JSON object")
        if body.get("v") != RECEIPT_VERSION:
            raise ClaimError(Reason.MALFORMED, f"receipt version {body.get('v')!r} is unknown")
        sig = body.get("sig")
        try:
            raw = unb64url(sig if isinstance(sig, str) else "", 64, "receipt signature")
        except IdentityError as exc:
            raise ClaimError(Reason.MALFORMED, str(exc)) from None
        return cls(
            _agent(body, "market"),
            _text(body, "task"),
            _count(body, "attempt", 1),
            _agent(body, "asker"),
            _agent(body, "worker"),
            _text(body, "model"),
            _count(body, "promptTokens"),
            _count(body, "completionTokens"),
            _hash(body, "header"),
            _hash(body, "run"),
            _count(body, "price"),
            raw,
        )

    def verify(self) -> None:
        """Return if the receipt is its asker's signature; ClaimError else."""
        try:
            verify(self.asker, self.message(), self.sig)
        except (BadSignature, IdentityError, CanonicalError):
            raise ClaimError(
                Reason.RECEIPT_SIGNATURE, f"the receipt of task {self.task} is not its asker's"
            ) from None


class RunEnd(Enum):
    """How a run ended, for a claim without receipt (credits.md §3)."""

    DONE = "done"  # the worker finished
    ASKER_STOPPED = "asker_stopped"  # the asker aborted or left mid-answer
    WORKER_FAULT = "worker_fault"  # the worker failed, vanished or handed the task back


@dataclass(frozen=True)
class Delivery:
    """What the market recorded writing to the asker's socket for one run: the run's
    end, whether its final chunk went out, and the answer's plaintext bytes that did
    (ciphertext less each chunk's tag). The market's own statement (recorded by the
    outbox, protocol-v3 step 2); it bounds what an asker that signs nothing is charged."""

    end: RunEnd
    final: bool
    bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"end": self.end.value, "final": self.final, "bytes": self.bytes}

    @classmethod
    def parse(cls, body: object) -> Delivery:
        if not isinstance(body, dict) or not isinstance(body.get("final"), bool):
            raise ClaimError(Reason.MALFORMED, "a delivery record is {end, final, bytes}")
        try:
            end = RunEnd(body.get("end"))
        except ValueError:
            raise ClaimError(Reason.MALFORMED, "a delivery record's end is unknown") from None
        return cls(end, body["final"], _count(body, "bytes"))


def unsigned_tokens(
    usage: tuple[int, int], header: dict[str, Any], delivery: Delivery
) -> tuple[int, int]:
    """The (prompt, completion) tokens an asker that signed no receipt is charged:
    nothing for a run that failed by the worker's fault or delivered nothing; else the
    worker's usage, bounded by the header's ``maxTokens`` and ``promptBytes`` and by
    the bytes delivered (a token is at least one byte of text). A run the asker stopped
    is thereby charged for what went out."""
    if delivery.end is RunEnd.WORKER_FAULT:
        raise ClaimError(Reason.NOT_PAYABLE, "a run ended by the worker's fault is not charged")
    if delivery.bytes == 0:
        raise ClaimError(Reason.NOT_PAYABLE, "nothing was delivered to the asker")
    prompt, completion = usage
    max_tokens, prompt_bytes = header.get("maxTokens"), header.get("promptBytes")
    if type(max_tokens) is int and max_tokens >= 0:
        completion = min(completion, max_tokens)
    if type(prompt_bytes) is int and prompt_bytes >= 0:
        prompt = min(prompt, prompt_bytes)
    return prompt, min(completion, delivery.bytes)


@dataclass(frozen=True)
class Settlement:
    """A checked claim: what the ledger records for one run. Made by ``Claim.check``."""

    task: str
    attempt: int
    asker: str
    worker: str
    price: int
    tax: int
    proof: dict[str, Any]  # the receipt and the header, as they were signed


@dataclass(frozen=True)
class Claim:
    """A worker's claim for one run: the asker's signed header and its receipt, or, when
    the asker signed none, the worker's own usage and run hash (charged from the
    market's delivery record, ``unsigned_tokens``)."""

    header: dict[str, Any]
    attempt: int
    receipt: Receipt | None = None
    usage: tuple[int, int] | None = None  # (promptTokens, completionTokens), no receipt
    run: str | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"header": self.header, "attempt": self.attempt}
        if self.receipt is not None:
            body["receipt"] = self.receipt.to_json()
        if self.usage is not None:
            body["usage"] = {"promptTokens": self.usage[0], "completionTokens": self.usage[1]}
        if self.run is not None:
            body["run"] = self.run
        return body

    @classmethod
    def parse(cls, body: object) -> Claim:
        """A claim from the JSON of ``CONTROL {"op": "claim"}``, shapes checked."""
        if not isinstance(body, dict) or not isinstance(body.get("header"), dict):
            raise ClaimError(Reason.MALFORMED, "a claim carries the task's signed header")
        attempt = _count(body, "attempt", 1)
        if "receipt" in body:
            return cls(body["header"], attempt, Receipt.parse(body["receipt"]))
        usage = body.get("usage")
        if not isinstance(usage, dict):
            raise ClaimError(Reason.MALFORMED, "a claim carries a receipt or the worker's usage")
        tokens = (_count(usage, "promptTokens"), _count(usage, "completionTokens"))
        return cls(body["header"], attempt, usage=tokens, run=_hash(body, "run"))

    def check(
        self,
        claimer: str,
        market: str,
        params: float | int | str,
        delivery: Delivery | None = None,
    ) -> Settlement:
        """Every check of credits.md §3 (``claimer``: the identity the claim came from;
        ``params``: the model's size in the worker's advert, or the market's pin). A
        claim without receipt needs the market's ``delivery`` record of the run (given
        once ``--receipt-wait`` has passed without a receipt)."""
        header = self.header
        try:
            hashed = verify_header(header)
        except HeaderError as exc:
            raise ClaimError(Reason.HEADER_SIGNATURE, str(exc)) from None
        receipt = self.receipt
        if receipt is None:
            if delivery is None:
                raise ClaimError(
                    Reason.NO_RECEIPT,
                    f"task {header['id']}: no receipt, and no delivery record to charge from",
                )
            return self._unsigned(claimer, params, delivery)
        receipt.verify()
        if receipt.asker != header["asker"]:
            raise ClaimError(Reason.WRONG_ASKER, "the receipt's asker is not the header's")
        if claimer != receipt.worker:
            raise ClaimError(Reason.WRONG_WORKER, "the claimer is not the receipt's worker")
        theirs = (receipt.market, receipt.task, receipt.attempt, receipt.header, receipt.model)
        ours = (market, header["id"], self.attempt, hashed, header["model"])
        names = ("market", "task", "attempt", "header", "model")
        for name, a, b in zip(names, theirs, ours, strict=True):
            if a != b:
                raise ClaimError(Reason.MISMATCH, f"the receipt's {name} is not the claim's")
        try:
            due = pricing.price(receipt.prompt_tokens, receipt.completion_tokens, params)
        except pricing.PriceError as exc:
            raise ClaimError(Reason.WRONG_PRICE, str(exc)) from None
        if receipt.price != due:
            raise ClaimError(
                Reason.WRONG_PRICE, f"the receipt's price {receipt.price} is not the rule's {due}"
            )
        max_price = header.get("maxPrice")
        if max_price is None or receipt.price > max_price:
            raise ClaimError(
                Reason.OVER_MAX_PRICE,
                f"price {receipt.price} is above the header's maxPrice {max_price}",
            )
        proof = {
            "receipt": receipt.to_json(),
            "header": header,
            "params": pricing.params_text(params),
        }
        return Settlement(
            receipt.task,
            receipt.attempt,
            receipt.asker,
            receipt.worker,
            receipt.price,
            pricing.tax(receipt.price),
            proof,
        )

    def _unsigned(self, claimer: str, params: float | int | str, delivery: Delivery) -> Settlement:
        """The charge of a run its asker signed no receipt for (credits.md §3), capped
        by the header's ``maxPrice``; the worker is the claimer (the market checks that
        it owns the run document the delivery record is of)."""
        if self.usage is None or self.run is None:
            raise ClaimError(Reason.MALFORMED, "a claim without receipt carries usage and run")
        header = self.header
        tokens = unsigned_tokens(self.usage, header, delivery)
        max_price = header.get("maxPrice")
        if max_price is None:
            raise ClaimError(Reason.OVER_MAX_PRICE, "the header sets no maxPrice: no consent")
        try:
            price = min(pricing.price(*tokens, params), max_price)
        except pricing.PriceError as exc:
            raise ClaimError(Reason.WRONG_PRICE, str(exc)) from None
        proof = {
            "header": header,
            "attempt": self.attempt,
            "worker": claimer,
            "usage": {"promptTokens": self.usage[0], "completionTokens": self.usage[1]},
            "run": self.run,
            "delivery": delivery.to_json(),
            "params": pricing.params_text(params),
        }
        task, asker = str(header["id"]), str(header["asker"])
        return Settlement(task, self.attempt, asker, claimer, price, pricing.tax(price), proof)
