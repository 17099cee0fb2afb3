"""The market's durable store: each room's Yjs updates and the archive of finished tasks;
for a room of protocol 3, each document's update log (``doc_updates``, written by
``igora.market.v3.doclog``); the membership of a secure market (``members``, ``bans``,
``invites``: ``igora.market.members``), which ``igora market members|ban|invite`` write
from another process while the market runs (WAL: readers and a writer at once).

One SQLite file (WAL mode). A room (``persistence.RoomHistory``) writes a lone update at once
and groups a stream of them into one transaction per ``FLUSH_INTERVAL`` seconds, so a token
stream costs one disk write per interval rather than one per token. On load, and whenever
a room has accumulated ``SQUASH_AFTER`` rows, its history is replaced by one update holding
the current state. See docs/market.md for what survives a crash.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

FLUSH_INTERVAL = 0.05


class WriteBehind:
    """When a history's pending writes go to the store: at once when it is idle, then at
    most once per ``FLUSH_INTERVAL`` while ``busy()`` (a token stream is one transaction
    per interval, a lone change is on disk a few milliseconds after it came); a failed
    ``flush`` is logged and tried again a second later. One for a v2 room's history and
    one for a v3 room's documents."""

    def __init__(
        self, flush: Callable[[], Awaitable[None]], busy: Callable[[], bool], what: str
    ) -> None:
        self._flush = flush
        self._busy = busy
        self._what = what
        self._task: asyncio.Task[None] | None = None
        self._last = 0.0

    def soon(self) -> None:
        """There is something to write."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while self._busy():
            wait = self._last + FLUSH_INTERVAL - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._last = time.monotonic()
            try:
                await self._flush()
            except Exception:
                log.exception("%s: writing to the store failed; retrying", self._what)
                await asyncio.sleep(1.0)


SQUASH_AFTER = 2_000

log = logging.getLogger("igora.market.store")

OPEN_WAIT = 10.0
"""Seconds a store locked by another process opening it (a replica) is waited for."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS updates (room TEXT NOT NULL, data BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS updates_room ON updates (room);
CREATE TABLE IF NOT EXISTS doc_updates (
    room TEXT NOT NULL, doc TEXT NOT NULL, data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS doc_updates_doc ON doc_updates (room, doc);
CREATE TABLE IF NOT EXISTS members (id TEXT PRIMARY KEY, note TEXT NOT NULL, added REAL NOT NULL);
CREATE TABLE IF NOT EXISTS bans (id TEXT PRIMARY KEY, reason TEXT NOT NULL, banned REAL NOT NULL);
CREATE TABLE IF NOT EXISTS invites (
    nonce TEXT PRIMARY KEY, uses INTEGER NOT NULL, exp INTEGER NOT NULL, made REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS archive (
    room TEXT NOT NULL, id TEXT NOT NULL, state TEXT, task TEXT NOT NULL, archived REAL NOT NULL,
    PRIMARY KEY (room, id)
);
"""


class StoreError(OSError):
    """The store cannot be opened (a folder in its place, not an SQLite file, ...)."""


class Store:
    """Thread-safe SQLite store; every write goes through one lock and one connection.
    ``Store(":memory:")`` keeps it in memory (``durable`` is False)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.durable = str(path) != ":memory:"
        self._lock = threading.Lock()
        try:
            if self.durable:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = self._open(str(path))
        except (sqlite3.Error, OSError) as exc:
            why = "it is a folder" if self.path.is_dir() else str(exc)
            raise StoreError(f"cannot open the store {path}: {why}") from None
        self._rows: dict[str, int] = {}

    @staticmethod
    def _open(path: str) -> sqlite3.Connection:
        """Connect and set the store up. Replicas sharing a data folder open it at once:
        the switch to WAL takes the file alone and SQLite answers "locked" at once rather
        than wait, so that is tried again for up to ``OPEN_WAIT`` s."""
        end = time.monotonic() + OPEN_WAIT
        while True:
            db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.executescript(_SCHEMA)
                return db
            except sqlite3.OperationalError as exc:
                db.close()
                if "locked" not in str(exc) or time.monotonic() > end:
                    raise
                time.sleep(0.05)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def load(self, room: str) -> list[bytes]:
        with self._lock:
            rows = self._db.execute("SELECT data FROM updates WHERE room=? ORDER BY rowid", (room,))
            data = [bytes(r[0]) for r in rows]
        self._rows[room] = len(data)
        return data

    def append(self, room: str, updates: list[bytes]) -> int:
        """Append updates; return the room's row count."""
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT INTO updates (room, data) VALUES (?, ?)", [(room, u) for u in updates]
            )
            self._db.execute("COMMIT")
        self._rows[room] = self._rows.get(room, 0) + len(updates)
        return self._rows[room]

    def replace(self, room: str, state: bytes) -> None:
        """Replace a room's whole history with one update holding its state."""
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM updates WHERE room=?", (room,))
            self._db.execute("INSERT INTO updates (room, data) VALUES (?, ?)", (room, state))
            self._db.execute("COMMIT")
        self._rows[room] = 1

    # ---------------------------------------------------------- protocol 3 documents
    def load_documents(self, room: str) -> dict[str, list[bytes]]:
        """The stored log of every document of a v3 room, by document name."""
        out: dict[str, list[bytes]] = {}
        with self._lock:
            rows = self._db.execute(
                "SELECT doc, data FROM doc_updates WHERE room=? ORDER BY rowid", (room,)
            )
            for doc, data in rows:
                out.setdefault(doc, []).append(bytes(data))
        return out

    def document_names(self, room: str) -> set[str]:
        """The names of the documents a v3 room has in the store."""
        with self._lock:
            rows = self._db.execute("SELECT DISTINCT doc FROM doc_updates WHERE room=?", (room,))
            return {doc for (doc,) in rows}

    def write_documents(
        self,
        room: str,
        appends: list[tuple[str, bytes]],
        replaces: dict[str, bytes | None],
    ) -> None:
        """In one transaction: append updates to documents' logs, and replace the whole
        log of others by one update (their merged state; None: the document is dropped)."""
        with self._lock:
            self._db.execute("BEGIN")
            for doc, state in replaces.items():
                self._db.execute("DELETE FROM doc_updates WHERE room=? AND doc=?", (room, doc))
                if state is not None:
                    self._db.execute(
                        "INSERT INTO doc_updates (room, doc, data) VALUES (?, ?, ?)",
                        (room, doc, state),
                    )
            self._db.executemany(
                "INSERT INTO doc_updates (room, doc, data) VALUES (?, ?, ?)",
                [(room, doc, u) for doc, u in appends],
            )
            self._db.execute("COMMIT")

    # ---------------------------------------------------------- membership
    def members(self) -> dict[str, str]:
        """Every member's id and note."""
        with self._lock:
            rows = self._db.execute("SELECT id, note FROM members ORDER BY added").fetchall()
        return {str(i): str(n) for i, n in rows}

    def bans(self) -> dict[str, str]:
        """Every banned id and its reason."""
        with self._lock:
            rows = self._db.execute("SELECT id, reason FROM bans ORDER BY banned").fetchall()
        return {str(i): str(r) for i, r in rows}

    def set_row(self, table: str, id_: str, text: str) -> bool:
        """Add (or update the note or reason of) ``id_`` in ``members`` or ``bans``;
        whether it was new."""
        column = {"members": "note", "bans": "reason"}[table]
        when = {"members": "added", "bans": "banned"}[table]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            new = self._db.execute(f"SELECT 1 FROM {table} WHERE id=?", (id_,)).fetchone() is None
            self._db.execute(
                f"INSERT INTO {table} (id, {column}, {when}) VALUES (?, ?, ?) "
                f"ON CONFLICT (id) DO UPDATE SET {column}=excluded.{column}",
                (id_, text, time.time()),
            )
            self._db.execute("COMMIT")
        return new

    def delete_row(self, table: str, id_: str) -> bool:
        """Remove ``id_`` from ``members`` or ``bans``; whether it was there."""
        table = {"members": "members", "bans": "bans"}[table]  # no other name in the SQL
        with self._lock:
            cursor = self._db.execute(f"DELETE FROM {table} WHERE id=?", (id_,))
        return cursor.rowcount > 0

    def add_invite(self, nonce: str, uses: int, exp: int) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO invites (nonce, uses, exp, made) VALUES (?, ?, ?, ?)",
                (nonce, uses, exp, time.time()),
            )

    def use_invite(self, nonce: str, uses: int, exp: int, id_: str, note: str) -> bool:
        """In one transaction: take one use of invitation ``nonce`` (its row made with
        ``uses`` if the market never saw it) and add ``id_`` to the members; False, and
        nothing changed, if it has no use left."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT uses FROM invites WHERE nonce=?", (nonce,))
                found = row.fetchone()
                left = uses if found is None else int(found[0])
                if left <= 0:
                    self._db.execute("ROLLBACK")
                    return False
                self._db.execute(
                    "INSERT INTO invites (nonce, uses, exp, made) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (nonce) DO UPDATE SET uses=excluded.uses",
                    (nonce, left - 1, exp, time.time()),
                )
                self._db.execute(
                    "INSERT OR IGNORE INTO members (id, note, added) VALUES (?, ?, ?)",
                    (id_, note, time.time()),
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return True

    def archive(self, room: str, tasks: list[dict[str, Any]]) -> None:
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR REPLACE INTO archive (room, id, state, task, archived) "
                "VALUES (?,?,?,?,?)",
                [(room, str(t.get("id")), str(t.get("state")), json.dumps(t), now) for t in tasks],
            )
            self._db.execute("COMMIT")

    def archived(self, room: str, task_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT task FROM archive WHERE room=? AND id=?", (room, task_id)
            ).fetchone()
        return json.loads(row[0]) if row else None

    def archive_count(self, room: str) -> int:
        with self._lock:
            return int(
                self._db.execute("SELECT COUNT(*) FROM archive WHERE room=?", (room,)).fetchone()[0]
            )
