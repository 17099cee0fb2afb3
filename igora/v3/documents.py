"""The documents of a v3 room, their owners and who may read them (protocol-v3.md §4).

A document's owner, the only identity that may write it, is read from its name and
never from its content, so the market's permission check is a parse and a comparison.

| name | owner | readers |
|---|---|---|
| ``dir``, ``who``, ``standing`` | the market | ``dir``: anyone; ``who``, ``standing``: brokers |
| ``board`` | the broker lease holder | anyone |
| ``in/<id>`` | the broker lease holder | ``<id>``, brokers |
| ``a/<id>``, ``w/<id>`` | ``<id>`` | ``<id>``, brokers |
| ``p/<id>/<tid>``, ``r/<id>/<tid>.<n>`` | ``<id>`` | ``<id>``; others once attached |

A name may end in ``@<epoch>`` (a replaced long-lived document, §9); no suffix is epoch 0.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from enum import Enum

from ..identity import ID_LENGTH

TASK_ID = re.compile(r"[A-Za-z0-9_-]{16}")
_AGENT = rf"[A-Za-z0-9_-]{{{ID_LENGTH}}}"
_NUMBER = r"(?:0|[1-9][0-9]{0,8})"
_NAME = re.compile(
    rf"(?P<kind>dir|who|board|standing)"
    rf"|(?P<kind2>in|a|w)/(?P<id>{_AGENT})"
    rf"|p/(?P<pid>{_AGENT})/(?P<ptid>[A-Za-z0-9_-]{{16}})"
    rf"|r/(?P<rid>{_AGENT})/(?P<rtid>[A-Za-z0-9_-]{{16}})\.(?P<n>[1-9][0-9]{{0,3}})"
)
_EPOCH = re.compile(rf"@(?P<epoch>{_NUMBER})")
PREFIXES = ("a/", "w/", "in/")
"""The prefixes a broker may subscribe to (protocol-v3.md §4)."""


class DocumentError(ValueError):
    """A name that is no document of a v3 room."""


class DocKind(Enum):
    DIR = "dir"
    WHO = "who"
    STANDING = "standing"  # asker id -> balance bucket (credits.md §4)
    BOARD = "board"
    INBOX = "in"
    ASKER = "a"
    WORKER = "w"
    PROMPT = "p"
    RUN = "r"


class Owner(Enum):
    """Who writes a kind of document."""

    MARKET = "market"
    LEASE = "lease"  # the connection holding the broker lease
    AGENT = "agent"  # the agent whose id is in the name


OWNERS = {
    DocKind.DIR: Owner.MARKET,
    DocKind.WHO: Owner.MARKET,
    DocKind.STANDING: Owner.MARKET,
    DocKind.BOARD: Owner.LEASE,
    DocKind.INBOX: Owner.LEASE,
    DocKind.ASKER: Owner.AGENT,
    DocKind.WORKER: Owner.AGENT,
    DocKind.PROMPT: Owner.AGENT,
    DocKind.RUN: Owner.AGENT,
}

TASK_DOCUMENTS = frozenset({DocKind.PROMPT, DocKind.RUN})
"""Per-task documents: live as long as their task, read by others only once attached."""


@dataclass(frozen=True, slots=True)
class DocName:
    """What a document's name says."""

    name: str  # as written, epoch suffix included
    kind: DocKind
    agent: str | None = None  # the id in the name (the owner, or for in/ the reader)
    task: str | None = None
    attempt: int | None = None
    epoch: int = 0

    @property
    def owner(self) -> Owner:
        return OWNERS[self.kind]

    @property
    def base(self) -> str:
        """The name without its epoch suffix."""
        return self.name.partition("@")[0]


@functools.lru_cache(maxsize=4096)
def parse(name: str) -> DocName:
    """The document a name designates; ``DocumentError`` if none. Remembered for the
    last 4,096 names (a ``DocName`` never changes): a name is read again at every frame
    of its document and every local write to it, ~5 µs each."""
    base, at, suffix = name.partition("@")
    epoch = 0
    if at:
        m = _EPOCH.fullmatch(at + suffix)
        if m is None:
            raise DocumentError(f"bad epoch in document name {name[:80]!r}")
        epoch = int(m["epoch"])
    m = _NAME.fullmatch(base)
    if m is None:
        raise DocumentError(f"unknown document {name[:80]!r}")
    if m["kind"]:
        return DocName(name, DocKind(m["kind"]), epoch=epoch)
    if m["kind2"]:
        return DocName(name, DocKind(m["kind2"]), m["id"], epoch=epoch)
    if m["pid"]:
        return DocName(name, DocKind.PROMPT, m["pid"], m["ptid"], epoch=epoch)
    return DocName(name, DocKind.RUN, m["rid"], m["rtid"], int(m["n"]), epoch=epoch)


def may_write(doc: DocName, ids: frozenset[str], lease: bool) -> bool:
    """Whether a connection that proved ``ids`` (and holds the broker lease or not) may
    write ``doc``."""
    owner = doc.owner
    if owner is Owner.AGENT:
        return doc.agent in ids
    if owner is Owner.LEASE:
        return lease
    return False  # the market's own


def may_read(doc: DocName, ids: frozenset[str], broker: bool, attached: bool) -> bool:
    """Whether a connection may subscribe to ``doc``: ``broker`` if one of its ids may
    hold the broker lease, ``attached`` if the lease holder attached it to ``doc``."""
    kind = doc.kind
    if kind in (DocKind.DIR, DocKind.BOARD):
        return True
    if kind in (DocKind.WHO, DocKind.STANDING):
        return broker
    if kind in TASK_DOCUMENTS:
        return doc.agent in ids or attached
    return doc.agent in ids or broker  # in/, a/, w/


def may_read_prefix(prefix: str, broker: bool) -> bool:
    """Prefix subscriptions are for brokers, and only to ``a/``, ``w/``, ``in/``."""
    return broker and prefix in PREFIXES
