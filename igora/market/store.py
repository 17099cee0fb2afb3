"""The market's durable store: each room's Yjs updates and the archive of finished tasks;
for a room of protocol 3, each document's update log (``doc_updates``, written by
``igora.market.v3.doclog``).

One SQLite file (WAL mode). A room (``persistence.RoomHistory``) writes a lone update at once
and groups a stream of them into one transaction per ``FLUSH_INTERVAL`` seconds, so a token
stream costs one disk write per interval rather than one per token. On load, and whenever
a room has accumulated ``SQUASH_AFTER`` rows, its history is replaced by one update holding
the current state. See docs/market.md for what survives a crash.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

FLUSH_INTERVAL = 0.05
SQUASH_AFTER = 2_000

log = logging.getLogger("igora.market.store")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS updates (room TEXT NOT NULL, data BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS updates_room ON updates (room);
CREATE TABLE IF NOT EXISTS doc_updates (
    room TEXT NOT NULL, doc TEXT NOT NULL, data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS doc_updates_doc ON doc_updates (room, doc);
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
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            why = "it is a folder" if self.path.is_dir() else str(exc)
            raise StoreError(f"cannot open the store {path}: {why}") from None
        self._rows: dict[str, int] = {}

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
