"""A small world of identities for the credits tests: a market, askers, workers, and the
signed headers, receipts and claims of their runs (real keys, real signatures)."""

from __future__ import annotations

import hashlib
from typing import Any

from nacl.signing import SigningKey

from igora.credits.receipts import Claim, Receipt, run_hash
from igora.identity import Identity
from igora.v3.header import sign_header

PARAMS = "0.135"  # SmolLM2-135M: factor 2


def identity(name: str) -> Identity:
    """The same identity for the same name, in every process."""
    return Identity(SigningKey(hashlib.blake2b(name.encode(), digest_size=32).digest()))


MARKET = identity("market")
ASKERS = [identity(f"asker-{i}") for i in range(10)]
WORKERS = [identity(f"worker-{i}") for i in range(4)]


def task_id(n: int) -> str:
    return f"task{n:012d}"


def header(
    asker: Identity, tid: str, max_price: int | None = 10**9, model: str = "smollm2-135m"
) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "id": tid,
        "model": model,
        "maxTokens": 256,
        "promptBytes": 120,
        "date": 1764460000000,
        "deadline": 1764460600000,
    }
    if max_price is not None:
        fields["maxPrice"] = max_price
    return sign_header(asker, fields)


def receipt(
    asker: Identity,
    worker: Identity,
    head: dict[str, Any],
    attempt: int = 1,
    tokens: tuple[int, int] = (30, 200),
    params: str = PARAMS,
) -> Receipt:
    run = run_hash([b"chunk-0", b"chunk-1"])
    return Receipt.make(asker, MARKET.id, head, attempt, worker.id, *tokens, run, params)


def claim(
    asker: Identity,
    worker: Identity,
    n: int,
    attempt: int = 1,
    tokens: tuple[int, int] = (30, 200),
) -> Claim:
    """The claim ``worker`` makes for run ``attempt`` of task ``n`` of ``asker``."""
    head = header(asker, task_id(n))
    return Claim(head, attempt, receipt(asker, worker, head, attempt, tokens))


def settle_forever(path: str, per_group: int = 5) -> None:
    """Settle claims of runs 0, 1, 2, ... in groups of ``per_group`` until killed,
    printing ``committed A B`` (runs A to B) once each group's transaction has committed.
    What the crash test runs in a child process."""
    from igora.credits.ledger import Ledger

    ledger = Ledger(path, MARKET.id)
    with ledger.group():
        for a in ASKERS:
            ledger.grant(a.id, 10**9)
    n = 0
    while True:
        with ledger.group():
            for i in range(n, n + per_group):
                worker = WORKERS[i % len(WORKERS)]
                ledger.settle(claim(ASKERS[i % len(ASKERS)], worker, i), worker.id, PARAMS)
        print(f"committed {n} {n + per_group - 1}", flush=True)
        n += per_group


if __name__ == "__main__":
    import sys

    settle_forever(sys.argv[1])
