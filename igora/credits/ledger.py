"""The market's ledger of credits (docs/credits.md §2): SQLite, append-only, hash-chained.

``DATA/ledger.sqlite3`` in the market's data folder, apart from the room store (it is
never squashed). WAL with ``synchronous=FULL``: a committed entry survives a power cut,
not only a kill -9. Each operation commits on its own; ``group()`` puts several in one
transaction, so a market that groups the claims of one 50 ms tick pays one fsync.

Every entry has a unique ``key`` (``run:<asker>:<tid>:<n>:<kind>``, ``grant:<id>``,
``transfer:<sender>:<nonce>:<side>``): a second settlement of the same run, a second grant,
a replayed order insert nothing and move no balance. ``prev`` is BLAKE2b-256 of the
previous entry, so ``verify_chain`` (and anyone given the entries) sees an entry changed,
removed or inserted in the middle; the signed proofs let it recheck every amount.
Balances are a cache of the entries' sums, checked at open and rebuilt if they differ.
The sum of all balances but the ``tax`` account equals the grants minus the tax burned.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..identity import IdentityError, public_key
from . import pricing
from .entries import (
    GENESIS,
    TAX_ACCOUNT,
    Entry,
    Kind,
    LedgerError,
    audit,
    grant_key,
    proof_text,
    run_key,
    transfer_key,
)
from .receipts import Claim, Delivery, Settlement
from .transfer import TransferError, TransferOrder

__all__ = ["LEDGER_FILE", "TAX_ACCOUNT", "Entry", "Kind", "Ledger", "LedgerError"]

LEDGER_FILE = "ledger.sqlite3"
log = logging.getLogger("igora.credits")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
  seq      INTEGER PRIMARY KEY,
  key      TEXT NOT NULL UNIQUE,
  kind     TEXT NOT NULL CHECK (kind IN ('grant','earn','spend','transfer','tax')),
  account  TEXT NOT NULL,
  amount   INTEGER NOT NULL,
  task     TEXT,
  attempt  INTEGER,
  proof    TEXT NOT NULL,
  prev     BLOB NOT NULL,
  at       INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_account ON entries (account, seq);
CREATE TABLE IF NOT EXISTS balances (account TEXT PRIMARY KEY, amount INTEGER NOT NULL);
"""


_COLUMNS = "seq, key, kind, account, amount, task, attempt, proof, prev, at"


_Row = tuple[str, Kind, str, int, str | None, int | None]
"""An entry to append: key, kind, account, amount, task, attempt."""


def _entry(row: tuple[Any, ...]) -> Entry:
    seq, key, kind, account, amount, task, attempt, proof, prev, at = row
    return Entry(seq, key, Kind(kind), account, amount, task, attempt, proof, bytes(prev), at)


class Ledger:
    """One market's ledger. ``Ledger(path, market)`` opens or creates it for the market
    whose id is ``market``; ``Ledger(path)`` opens an existing one (``igora credits``).
    Thread-safe: every operation goes through one lock and one connection."""

    def __init__(self, path: Path | str, market: str | None = None) -> None:
        self.path = Path(path)
        if market is None and not self.path.is_file():
            raise LedgerError(f"no ledger at {self.path}")
        self._lock = threading.RLock()
        self._depth = 0  # open transaction levels
        self.commits = 0  # transactions committed by this object (each one fsync)
        try:
            if market is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            if market is None:
                self._check_is_ledger()  # before anything is written to someone else's file
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(_SCHEMA)
            self.market = self._market(market)
            self._head = self._read_head()
            self._check_balances()
        except sqlite3.Error as exc:
            why = "it is a folder" if self.path.is_dir() else str(exc)
            raise LedgerError(f"cannot open the ledger {self.path}: {why}") from None

    # --- opening -----------------------------------------------------------------

    def _check_is_ledger(self) -> None:
        tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master")}
        if not {"meta", "entries", "balances"} <= tables:
            self._db.close()
            raise LedgerError(f"{self.path} is not a ledger (no entries, balances, market)")

    def _market(self, market: str | None) -> str:
        row = self._db.execute("SELECT value FROM meta WHERE name='market'").fetchone()
        if row is None:
            if market is None:
                raise LedgerError(f"{self.path} is not a ledger (it names no market)")
            self._db.execute("INSERT INTO meta (name, value) VALUES ('market', ?)", (market,))
            return market
        if market is not None and row[0] != market:
            raise LedgerError(f"{self.path} is the ledger of market {row[0][:8]}, not {market[:8]}")
        return str(row[0])

    def _read_head(self) -> tuple[int, bytes]:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM entries ORDER BY seq DESC LIMIT 1")
        last = row.fetchone()
        return (0, GENESIS) if last is None else (last[0], _entry(last).digest())

    def _sums(self) -> dict[str, int]:
        rows = self._db.execute("SELECT account, SUM(amount) FROM entries GROUP BY account")
        return {a: int(s) for a, s in rows}

    def _cached(self) -> dict[str, int]:
        return {a: int(s) for a, s in self._db.execute("SELECT account, amount FROM balances")}

    def _check_balances(self) -> None:
        """Rebuild the balances from the entries if they differ (a check that should
        never find anything: both are written in one transaction)."""
        sums = self._sums()
        if sums == self._cached():
            return
        log.warning("ledger %s: balances differ from the entries; rebuilt", self.path)
        with self._transaction():
            self._db.execute("DELETE FROM balances")
            self._db.executemany("INSERT INTO balances VALUES (?, ?)", sums.items())

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- writing -----------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """A transaction, or inside one a savepoint: an operation that fails inside a
        group undoes only itself; the group decides for the rest."""
        with self._lock:
            head, level = self._head, self._depth
            name = f"s{level}"
            self._db.execute(f"SAVEPOINT {name}" if level else "BEGIN IMMEDIATE")
            if not level:  # another process may have appended (replicas, credits.md §7)
                self._head = self._read_head()
            self._depth += 1
            try:
                yield
            except BaseException:
                if level:
                    self._db.execute(f"ROLLBACK TO {name}")
                    self._db.execute(f"RELEASE {name}")
                else:
                    self._db.execute("ROLLBACK")
                self._head = head
                raise
            finally:
                self._depth -= 1
            self._db.execute(f"RELEASE {name}" if level else "COMMIT")
            if not level:
                self.commits += 1

    @contextlib.contextmanager
    def group(self) -> Iterator[Ledger]:
        """One transaction (one fsync) for every operation inside. An exception leaving
        the group undoes all of it; one caught inside undoes only its operation."""
        with self._transaction():
            yield self

    def _insert(self, entries: Sequence[_Row], proof: str) -> bool:
        """Append ``entries`` (key, kind, account, amount, task, attempt) sharing one
        proof, unless the first key is already there: then nothing (idempotence)."""
        first = entries[0][0]
        if self._db.execute("SELECT 1 FROM entries WHERE key=?", (first,)).fetchone():
            return False
        at = int(time.time() * 1000)
        seq, prev = self._head
        rows = []
        for key, kind, account, amount, task, attempt in entries:
            seq += 1
            rows.append((seq, key, kind.value, account, amount, task, attempt, proof, prev, at))
            prev = Entry(seq, key, kind, account, amount, task, attempt, proof, prev, at).digest()
        self._db.executemany(f"INSERT INTO entries ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)", rows)
        self._db.executemany(
            "INSERT INTO balances VALUES (?, ?) "
            "ON CONFLICT(account) DO UPDATE SET amount = amount + excluded.amount",
            [(account, amount) for _, _, account, amount, _, _ in entries],
        )
        self._head = (seq, prev)
        return True

    def record(self, s: Settlement) -> bool:
        """Record a checked run: ``spend`` (asker, −price), ``earn`` (worker, +price −
        tax), ``tax`` (burned). False if that run was settled already."""
        entries = [
            (run_key(s, Kind.SPEND), Kind.SPEND, s.asker, -s.price, s.task, s.attempt),
            (run_key(s, Kind.EARN), Kind.EARN, s.worker, s.price - s.tax, s.task, s.attempt),
            (run_key(s, Kind.TAX), Kind.TAX, TAX_ACCOUNT, s.tax, s.task, s.attempt),
        ]
        with self._transaction():
            return self._insert(entries, proof_text(s.proof))

    def settle(
        self,
        claim: Claim,
        claimer: str,
        params: float | int | str,
        delivery: Delivery | None = None,
    ) -> bool:
        """Check ``claim`` (credits.md §3; ClaimError naming the failed check) and record
        it. True if it moved balances, False if that run was already settled. A claim
        without receipt is charged from the market's ``delivery`` record."""
        return self.settlement(claim, claimer, params, delivery)[1]

    def settlement(
        self,
        claim: Claim,
        claimer: str,
        params: float | int | str,
        delivery: Delivery | None = None,
    ) -> tuple[Settlement, bool]:
        """``settle``, with the settlement checked (what the market logs and moves)."""
        checked = claim.check(claimer, self.market, params, delivery)
        return checked, self.record(checked)

    def grant(self, account: str, amount: int = pricing.DEFAULT_GRANT) -> bool:
        """Give ``account`` its grant, once in its life: False if it had one (or
        ``amount`` is 0: grants are off)."""
        if type(amount) is not int or not 0 <= amount <= pricing.MAX_AMOUNT:
            raise LedgerError(f"grant {amount!r} is not a millicredit count")
        try:
            public_key(account)
        except IdentityError as exc:
            raise LedgerError(f"grant: {exc}") from None
        if amount == 0:
            return False
        proof = proof_text({"grant": amount, "to": account})
        with self._transaction():
            return self._insert(
                [(grant_key(account), Kind.GRANT, account, amount, None, None)], proof
            )

    def transfer(self, order: TransferOrder) -> bool:
        """Apply a sender-signed order: False if it was applied already; TransferError if
        it is not for this market, not its sender's, or more than the sender has."""
        order.verify()
        if order.market != self.market:
            raise TransferError("the transfer order is for another market")
        with self._transaction():
            if self._db.execute(
                "SELECT 1 FROM entries WHERE key=?", (transfer_key(order, "out"),)
            ).fetchone():
                return False
            have = self.balance(order.sender)
            if have < order.amount:
                raise TransferError(
                    f"balance {pricing.credits_text(have)} cannot pay "
                    f"{pricing.credits_text(order.amount)}"
                )
            entries = [
                (
                    transfer_key(order, "out"),
                    Kind.TRANSFER,
                    order.sender,
                    -order.amount,
                    None,
                    None,
                ),
                (transfer_key(order, "in"), Kind.TRANSFER, order.to, order.amount, None, None),
            ]
            return self._insert(entries, proof_text(order.to_json()))

    # --- reading -----------------------------------------------------------------

    def balance(self, account: str) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT amount FROM balances WHERE account=?", (account,)
            ).fetchone()
        return int(row[0]) if row else 0

    def balances(self) -> dict[str, int]:
        """Every account's balance, ``tax`` (the total burned) included."""
        with self._lock:
            return self._cached()

    def entries(self, account: str | None = None, limit: int = 20, after: int = 0) -> list[Entry]:
        """The last ``limit`` entries (of ``account``, after ``seq`` ``after``), oldest
        first."""
        mine = "" if account is None else " AND account = ?"
        args: tuple[object, ...] = (after,) if account is None else (after, account)
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM entries WHERE seq > ?{mine} ORDER BY seq DESC LIMIT ?",
                (*args, limit),
            ).fetchall()
        return [_entry(r) for r in reversed(rows)]

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM entries").fetchone()[0])

    def totals(self) -> tuple[int, int]:
        """(grants, tax burned), in millicredits."""
        with self._lock:
            rows = dict(
                self._db.execute(
                    "SELECT kind, SUM(amount) FROM entries WHERE kind IN ('grant','tax') "
                    "GROUP BY kind"
                ).fetchall()
            )
        return int(rows.get("grant") or 0), int(rows.get("tax") or 0)

    def verify_chain(self) -> int:
        """Audit the whole ledger: the hash chain unbroken from the first entry, every
        proof's signatures and amounts, the balances equal to the entries' sums, and the
        sums equal to grants minus tax. The number of entries; LedgerError else."""
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM entries ORDER BY seq").fetchall()
            cached = self._cached()
        audit([_entry(r) for r in rows], cached, self.market)
        return len(rows)
