"""The ledger (docs/credits.md §2): settled once, grants once, transfers signed, a hash
chain that shows tampering, and balances that always add up to grants minus tax."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import pytest

from igora.credits import pricing
from igora.credits.ledger import TAX_ACCOUNT, Kind, Ledger, LedgerError
from igora.credits.receipts import Claim, ClaimError, Delivery, Reason, RunEnd, run_hash
from igora.credits.transfer import TransferError, TransferOrder

from .credits_world import ASKERS, MARKET, PARAMS, WORKERS, claim, header, identity, task_id

ASKER, WORKER = ASKERS[0], WORKERS[0]


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return Ledger(tmp_path / "ledger.sqlite3", MARKET.id)


def held(ledger: Ledger) -> int:
    return sum(v for a, v in ledger.balances().items() if a != TAX_ACCOUNT)


def test_a_settled_run_moves_both_balances_by_exactly_the_price(ledger: Ledger) -> None:
    ledger.grant(ASKER.id)
    assert ledger.settle(claim(ASKER, WORKER, 1), WORKER.id, PARAMS)
    assert ledger.balance(ASKER.id) == pricing.DEFAULT_GRANT - 1_260
    assert ledger.balance(WORKER.id) == 1_260 - 26
    assert ledger.balance(TAX_ACCOUNT) == 26
    kinds = [e.kind for e in ledger.entries()]
    assert kinds == [Kind.GRANT, Kind.SPEND, Kind.EARN, Kind.TAX]


def test_a_replayed_claim_inserts_nothing(ledger: Ledger) -> None:
    c = claim(ASKER, WORKER, 1)
    assert ledger.settle(c, WORKER.id, PARAMS)
    before = (ledger.count(), ledger.balances())
    for _ in range(3):
        assert not ledger.settle(c, WORKER.id, PARAMS)
    assert (ledger.count(), ledger.balances()) == before


def test_a_refused_claim_changes_nothing(ledger: Ledger) -> None:
    ledger.grant(ASKER.id)
    with pytest.raises(ClaimError):
        ledger.settle(claim(ASKER, WORKER, 1), WORKERS[1].id, PARAMS)  # not its receipt
    assert ledger.count() == 1 and ledger.balance(WORKERS[1].id) == 0


def test_a_second_attempt_of_a_task_is_a_run_of_its_own(ledger: Ledger) -> None:
    assert ledger.settle(claim(ASKER, WORKER, 1, attempt=1), WORKER.id, PARAMS)
    assert ledger.settle(claim(ASKER, WORKERS[1], 1, attempt=2), WORKERS[1].id, PARAMS)
    assert ledger.balance(ASKER.id) == -2 * 1_260


def test_an_identity_is_granted_once_and_a_zero_grant_is_none(ledger: Ledger) -> None:
    assert ledger.grant(ASKER.id, 5_000)
    assert not ledger.grant(ASKER.id, 5_000)
    assert not ledger.grant(ASKERS[1].id, 0)
    assert ledger.balances() == {ASKER.id: 5_000}
    with pytest.raises(LedgerError):
        ledger.grant(ASKERS[2].id, -1)
    with pytest.raises(LedgerError, match="agent id"):
        ledger.grant("tax", 1_000)


def test_a_transfer_moves_credits_once_and_only_what_the_sender_has(ledger: Ledger) -> None:
    ledger.grant(ASKER.id, 10_000)
    order = TransferOrder.make(ASKER, MARKET.id, ASKERS[1].id, 4_000)
    assert ledger.transfer(order)
    assert not ledger.transfer(order)  # the nonce is its key
    assert (ledger.balance(ASKER.id), ledger.balance(ASKERS[1].id)) == (6_000, 4_000)
    with pytest.raises(TransferError, match="cannot pay"):
        ledger.transfer(TransferOrder.make(ASKER, MARKET.id, ASKERS[1].id, 6_001))
    assert ledger.count() == 3


def test_a_transfer_must_be_signed_by_its_sender_for_this_market(ledger: Ledger) -> None:
    ledger.grant(ASKER.id, 10_000)
    order = TransferOrder.make(ASKER, MARKET.id, ASKERS[1].id, 1_000)
    stolen = TransferOrder.parse({**order.to_json(), "to": WORKER.id})
    with pytest.raises(TransferError, match="not signed"):
        ledger.transfer(stolen)
    with pytest.raises(TransferError, match="another market"):
        ledger.transfer(TransferOrder.make(ASKER, WORKER.id, ASKERS[1].id, 1_000))
    with pytest.raises(TransferError):
        TransferOrder.make(ASKER, MARKET.id, ASKER.id, 1_000)  # to oneself
    assert ledger.count() == 1


def test_a_group_commits_all_or_nothing(ledger: Ledger) -> None:
    with ledger.group():
        ledger.grant(ASKER.id)
        ledger.settle(claim(ASKER, WORKER, 1), WORKER.id, PARAMS)
    assert ledger.count() == 4
    with pytest.raises(ClaimError), ledger.group():
        ledger.settle(claim(ASKER, WORKER, 2), WORKER.id, PARAMS)
        ledger.settle(claim(ASKER, WORKER, 3), "not the worker", PARAMS)
    assert ledger.count() == 4
    assert ledger.settle(claim(ASKER, WORKER, 2), WORKER.id, PARAMS)  # the chain goes on
    assert ledger.verify_chain() == 7


def test_the_balances_add_up_over_1000_random_runs(ledger: Ledger) -> None:
    """1,000 settled runs across 4 workers and 10 askers (some replayed, some refused),
    grants and transfers: every balance is its entries' sum, and their total is the
    grants minus the tax."""
    rng = random.Random(16)
    for a in ASKERS:
        ledger.grant(a.id, 50_000)
    settled = 0
    for start in range(0, 1_000, 10):  # ten runs a transaction, as a market groups a tick's
        with ledger.group():
            for n in range(start, start + 10):
                asker, worker = rng.choice(ASKERS), rng.choice(WORKERS)
                c = claim(asker, worker, n, tokens=(rng.randint(0, 500), rng.randint(0, 500)))
                if rng.random() < 0.05:  # a worker cashing another's receipt
                    thief = rng.choice([w for w in WORKERS if w != worker])
                    with pytest.raises(ClaimError):
                        ledger.settle(c, thief.id, PARAMS)
                settled += ledger.settle(c, worker.id, PARAMS)
                assert not ledger.settle(c, worker.id, PARAMS)  # replayed at once
                giver, taker = rng.sample(ASKERS, 2)
                if rng.random() < 0.05 and ledger.balance(giver.id) > 0:
                    amount = rng.randint(1, ledger.balance(giver.id))
                    ledger.transfer(TransferOrder.make(giver, MARKET.id, taker.id, amount))
    assert settled == 1_000
    grants, tax = ledger.totals()
    assert grants == 10 * 50_000 and tax > 0
    assert held(ledger) == grants - tax
    spent = -sum(e.amount for e in ledger.entries(limit=10**6) if e.kind is Kind.SPEND)
    earned = sum(ledger.balance(w.id) for w in WORKERS)
    assert earned == spent - tax
    assert ledger.verify_chain() == ledger.count()


def test_the_ledger_reopens_with_the_same_chain_and_market(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    with Ledger(path, MARKET.id) as ledger:
        ledger.grant(ASKER.id)
        ledger.settle(claim(ASKER, WORKER, 1), WORKER.id, PARAMS)
    with Ledger(path) as again:
        assert again.market == MARKET.id
        assert again.settle(claim(ASKER, WORKER, 2), WORKER.id, PARAMS)
        assert again.verify_chain() == 7
    with pytest.raises(LedgerError, match="ledger of market"):
        Ledger(path, ASKER.id)


def test_two_writers_of_one_file_append_to_one_chain(tmp_path: Path) -> None:
    """Two replicas overlapping as the ledger's holder (credits.md §7): each reads the
    chain's head inside its transaction, so their entries interleave in one chain."""
    path = tmp_path / "ledger.sqlite3"
    with Ledger(path, MARKET.id) as first, Ledger(path, MARKET.id) as second:
        first.grant(ASKER.id)
        assert second.settle(claim(ASKER, WORKER, 1), WORKER.id, PARAMS)
        assert first.settle(claim(ASKER, WORKER, 2), WORKER.id, PARAMS)
        assert not second.settle(claim(ASKER, WORKER, 2), WORKER.id, PARAMS)  # once
        assert first.verify_chain() == second.verify_chain() == 7


def test_no_ledger_and_not_a_ledger_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="no ledger at"):
        Ledger(tmp_path / "absent.sqlite3")
    (tmp_path / "junk").write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(LedgerError, match="cannot open"):
        Ledger(tmp_path / "junk")
    with pytest.raises(LedgerError, match="folder"):
        Ledger(tmp_path, MARKET.id)


def test_another_sqlite_file_is_not_a_ledger_and_stays_untouched(tmp_path: Path) -> None:
    """`igora credits --ledger DATA/market.sqlite3` (the room store) changes nothing."""
    store = tmp_path / "market.sqlite3"
    db = sqlite3.connect(store)
    db.execute("CREATE TABLE updates (room TEXT, data BLOB)")
    db.commit()
    db.close()
    before = store.read_bytes()
    with pytest.raises(LedgerError, match="is not a ledger"):
        Ledger(store)
    assert store.read_bytes() == before
    assert not (tmp_path / "market.sqlite3-wal").exists()


def _tamper(path: Path, sql: str, *args: object) -> None:
    db = sqlite3.connect(path)
    db.execute(sql, args)
    db.commit()
    db.close()


def _filled(path: Path) -> None:
    with Ledger(path, MARKET.id) as ledger:
        ledger.grant(ASKER.id)
        for n in range(3):
            ledger.settle(claim(ASKER, WORKER, n), WORKER.id, PARAMS)


@pytest.mark.parametrize(
    ("sql", "why"),
    [
        ("UPDATE entries SET amount = amount + 1000 WHERE seq = 3", "chain broken"),
        ("DELETE FROM entries WHERE seq = 5", "chain broken"),
        ("UPDATE entries SET account = 'tax' WHERE seq = 2", "chain broken"),
    ],
)
def test_verify_chain_sees_an_entry_changed_or_removed(tmp_path: Path, sql: str, why: str) -> None:
    path = tmp_path / "ledger.sqlite3"
    _filled(path)
    _tamper(path, sql)
    with Ledger(path) as ledger, pytest.raises(LedgerError, match=why):
        ledger.verify_chain()


def test_verify_chain_sees_a_rewritten_chain_whose_proofs_do_not_hold(tmp_path: Path) -> None:
    """An operator that recomputes every hash after raising an amount is still caught:
    the amount is not what the asker signed."""
    path = tmp_path / "ledger.sqlite3"
    _filled(path)
    _tamper(path, "UPDATE entries SET amount = amount + 1000 WHERE seq = 3")
    with Ledger(path) as ledger:  # rebuild the cache and the chain as a forger would
        rows = ledger._db.execute("SELECT seq FROM entries ORDER BY seq").fetchall()
        prev = bytes(32)
        for (seq,) in rows:
            ledger._db.execute("UPDATE entries SET prev = ? WHERE seq = ?", (prev, seq))
            (entry,) = [e for e in ledger.entries(limit=100) if e.seq == seq]
            prev = entry.digest()
    with Ledger(path) as ledger, pytest.raises(LedgerError, match="not its proof's"):
        ledger.verify_chain()


def test_balances_that_differ_from_the_entries_are_rebuilt_at_open(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    _filled(path)
    with Ledger(path) as ledger:
        right = ledger.balances()
    _tamper(path, "UPDATE balances SET amount = 1000000000 WHERE account = ?", WORKER.id)
    with Ledger(path) as ledger:
        assert ledger.balances() == right
        assert ledger.verify_chain() == 10


def test_a_new_identity_has_a_zero_balance_and_no_entries(ledger: Ledger) -> None:
    someone = identity("nobody")
    assert ledger.balance(someone.id) == 0 and ledger.entries(someone.id) == []


def test_an_operation_failing_inside_a_group_undoes_only_itself(ledger: Ledger) -> None:
    with ledger.group():
        ledger.grant(ASKER.id)
        with pytest.raises(ClaimError):
            ledger.settle(claim(ASKER, WORKER, 1), "not the worker", PARAMS)
        assert ledger.settle(claim(ASKER, WORKER, 2), WORKER.id, PARAMS)
    assert ledger.count() == 4 and ledger.verify_chain() == 4


# --- runs whose asker signed no receipt (credits.md §3) ------------------------------


def unsigned(n: int, usage: tuple[int, int] = (30, 200), max_price: int = 10**9) -> Claim:
    return Claim(header(ASKER, task_id(n), max_price), 1, usage=usage, run=run_hash([b"c"]))


def test_an_asker_that_read_its_answer_in_full_pays_without_signing(ledger: Ledger) -> None:
    read = Delivery(RunEnd.DONE, final=True, bytes=900)
    assert ledger.settle(unsigned(1), WORKER.id, PARAMS, read)
    assert ledger.balance(ASKER.id) == -1_260 and ledger.balance(WORKER.id) == 1_260 - 26
    # The receipt that arrives after the wait settles nothing more.
    assert not ledger.settle(claim(ASKER, WORKER, 1), WORKER.id, PARAMS)
    assert ledger.verify_chain() == 3


def test_an_asker_that_left_mid_answer_pays_for_what_went_out(ledger: Ledger) -> None:
    left = Delivery(RunEnd.ASKER_STOPPED, final=False, bytes=50)
    assert ledger.settle(unsigned(1), WORKER.id, PARAMS, left)
    assert ledger.balance(ASKER.id) == -(30 + 3 * 50) * 2  # 50 bytes: 50 tokens at most


def test_a_worker_s_inflated_usage_is_bounded_by_the_header_and_the_bytes(ledger: Ledger) -> None:
    read = Delivery(RunEnd.DONE, final=True, bytes=10**6)
    assert ledger.settle(unsigned(1, usage=(10**6, 10**6)), WORKER.id, PARAMS, read)
    assert ledger.balance(ASKER.id) == -(120 + 3 * 256) * 2  # promptBytes 120, maxTokens 256
    assert ledger.settle(unsigned(2, max_price=500), WORKER.id, PARAMS, read)
    assert ledger.balance(ASKER.id) == -(120 + 3 * 256) * 2 - 500  # never above maxPrice
    assert ledger.verify_chain() == 6


@pytest.mark.parametrize(
    "delivery",
    [
        Delivery(RunEnd.WORKER_FAULT, final=False, bytes=500),  # failed, vanished, handed back
        Delivery(RunEnd.DONE, final=False, bytes=0),  # nothing reached the asker
        Delivery(RunEnd.ASKER_STOPPED, final=False, bytes=0),
    ],
)
def test_runs_that_delivered_nothing_or_failed_by_the_worker_are_free(
    ledger: Ledger, delivery: Delivery
) -> None:
    with pytest.raises(ClaimError) as info:
        ledger.settle(unsigned(1), WORKER.id, PARAMS, delivery)
    assert info.value.reason is Reason.NOT_PAYABLE and ledger.count() == 0


def test_a_claim_without_receipt_needs_the_delivery_record(ledger: Ledger) -> None:
    with pytest.raises(ClaimError) as info:
        ledger.settle(unsigned(1), WORKER.id, PARAMS)
    assert info.value.reason is Reason.NO_RECEIPT
