"""API keys that speak for identities (docs/security.md §7): ``igora gateway keys``.

``igora gateway keys add NAME`` makes an identity in ``DATA/gateway/identities/NAME/``
(``igora.identity``'s key file: 0600 in a 0700 folder) and a new API key, ``ig-`` and 32
random bytes in base64url, printed once. ``DATA/gateway/keys.sqlite3`` keeps, per name,
only the SHA-256 of the key (random keys need no slow hash: nothing to guess) and the
identity's id. A gateway started with that file in its data folder accepts on ``/v1/*``
only the keys it holds (and ``--api-key`` ones), and sets ``request.state.api_key`` to
the ``ApiKey`` of the request (``speaker``): the identity a request speaks for, which the
v3 client signs with (step 3).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.requests import Request

from .. import arguments as arg
from ..config import data_dir
from ..identity import Identity, b64url, load_identity

FOLDER = "gateway"
KEYS_FILE = "keys.sqlite3"
PREFIX = "ig-"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    name TEXT PRIMARY KEY, hash BLOB NOT NULL UNIQUE, id TEXT NOT NULL, made REAL NOT NULL
);
"""

DESCRIPTION = """\
API keys of this gateway, each speaking for an identity of its own (docs/security.md §7).
`add NAME` makes the identity in DATA/gateway/identities/NAME (a key file only you can
read) and prints a new API key once: give it to the user, who sends it as
'Authorization: Bearer KEY'. The gateway keeps only its SHA-256, in
DATA/gateway/keys.sqlite3: a lost key cannot be printed again (remove it, add another).
A gateway whose data folder holds that file answers 401 to any other key; keys added or
removed while it runs count at the next request."""


def name(text: str) -> str:
    if not _NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text[:80]!r} is not a key name: 1 to 64 letters, digits, '_', '.', '-'"
        )
    return text


@dataclass(frozen=True)
class ApiKey:
    """A stored key: its name and the identity it speaks for."""

    name: str
    id: str
    folder: Path  # the identity's data folder

    def identity(self) -> Identity:
        """The identity's signing key, read from its folder."""
        return load_identity(self.folder)[0]


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class KeyStore:
    """``DATA/gateway/keys.sqlite3`` and the identities beside it."""

    def __init__(self, data: Path) -> None:
        self.folder = data / FOLDER
        self.path = self.folder / KEYS_FILE
        self._lock = threading.Lock()
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
            if os.name == "posix":
                os.chmod(self.path, 0o600)  # hashes only, but nobody else's business
        except (sqlite3.Error, OSError) as exc:
            raise OSError(f"cannot open the gateway's keys {self.path}: {exc}") from None

    @classmethod
    def existing(cls, data: Path) -> KeyStore | None:
        """The store of ``data`` if it has one (the gateway then checks keys)."""
        return cls(data) if (data / FOLDER / KEYS_FILE).is_file() else None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _identity_folder(self, key_name: str) -> Path:
        return self.folder / "identities" / key_name

    def add(self, key_name: str) -> tuple[str, ApiKey]:
        """A new key and its identity (made, or the one already in its folder)."""
        if self.find_name(key_name) is not None:
            raise OSError(f"a key named {key_name} exists: remove it first, or choose a name")
        folder = self._identity_folder(key_name)
        identity, _ = load_identity(folder)
        key = PREFIX + b64url(os.urandom(32))
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO keys (name, hash, id, made) VALUES (?, ?, ?, ?)",
                (key_name, digest(key), identity.id, time.time()),
            )
        return key, ApiKey(key_name, identity.id, folder)

    def remove(self, key_name: str) -> bool:
        """Forget a key (its identity's folder stays: its id may hold credits)."""
        with self._lock, self._db:
            cursor = self._db.execute("DELETE FROM keys WHERE name=?", (key_name,))
        return cursor.rowcount > 0

    def entries(self) -> list[ApiKey]:
        with self._lock:
            rows = self._db.execute("SELECT name, id FROM keys ORDER BY made").fetchall()
        return [ApiKey(n, i, self._identity_folder(n)) for n, i in rows]

    def find_name(self, key_name: str) -> ApiKey | None:
        return next((k for k in self.entries() if k.name == key_name), None)

    def lookup(self, key: str) -> ApiKey | None:
        """The stored key ``key`` is, if any (found by its hash)."""
        with self._lock:
            row = self._db.execute(
                "SELECT name, id FROM keys WHERE hash=?", (digest(key),)
            ).fetchone()
        return None if row is None else ApiKey(row[0], row[1], self._identity_folder(row[0]))


def speaker(request: Request) -> ApiKey | None:
    """The key (and identity) a gateway request speaks for; None without stored keys
    or with an ``--api-key`` key."""
    key: ApiKey | None = getattr(request.state, "api_key", None)
    return key


# ------------------------------------------------------------------ the command
def add_parser(sub: Any, formatter: type[argparse.HelpFormatter]) -> None:
    """``igora gateway keys add|list|remove``."""

    def data(q: argparse.ArgumentParser) -> None:
        arg.data_folder(q, "the gateway's data folder", inner=True)

    p = sub.add_parser(
        "keys",
        formatter_class=formatter,
        help="API keys, each with an identity of its own",
        description=DESCRIPTION,
        epilog="examples:\n  igora gateway keys add alice\n  igora gateway keys list\n"
        "  igora gateway keys remove alice",
    )
    data(p)
    how = p.add_subparsers(dest="keys_command", metavar="HOW", required=True)
    q = how.add_parser("add", formatter_class=formatter, help="make a key and its identity")
    q.add_argument("name", type=name, metavar="NAME", help="who the key is for")
    data(q)
    q = how.add_parser("list", formatter_class=formatter, help="print name and id of each key")
    data(q)
    q = how.add_parser("remove", formatter_class=formatter, help="refuse a key from now on")
    q.add_argument("name", type=name, metavar="NAME", help="the key's name")
    data(q)


def run(args: argparse.Namespace) -> int:
    """``igora gateway keys HOW``."""
    try:
        return _run(args)
    except sqlite3.Error as exc:
        raise OSError(f"the gateway's keys: {exc}") from None


def _run(args: argparse.Namespace) -> int:
    data: Path = getattr(args, "data", None) or data_dir()
    if args.keys_command != "add":  # no file made: a file turns the check on
        found = KeyStore.existing(data)
        if found is None:
            if args.keys_command == "list":
                return 0
            where = data / FOLDER / KEYS_FILE
            return arg.fail("igora gateway keys remove", f"no keys in {where}")
    store = found if args.keys_command != "add" and found else KeyStore(data)
    try:
        if args.keys_command == "add":
            key, entry = store.add(args.name)
            print(key)
            print(
                f"igora gateway: key {entry.name} speaks for identity {entry.id}; only its "
                f"hash is kept in {store.path}: this is the only time it is shown",
                file=sys.stderr,
            )
            return 0
        if args.keys_command == "list":
            for entry in store.entries():
                print(f"{entry.name}  {entry.id}")
            return 0
        if store.remove(args.name):
            print(f"igora gateway: removed key {args.name}", file=sys.stderr)
            return 0
        return arg.fail("igora gateway keys remove", f"no key named {args.name} in {store.path}")
    finally:
        store.close()
