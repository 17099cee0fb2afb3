"""Epochs of a long-lived document (docs/protocol-v3.md §9): when to replace it, and the
fresh ``Doc`` that replaces it.

A long-lived document (``a/``, ``w/``, ``in/``, ``board``, ``dir``, ``who``) gains and
loses a map key per task. Yjs keeps a deleted entry as a tombstone (a few bytes each, in
every copy: the owner's ``Doc``, the market's log, each reader's ``Doc``), so such a
document grows with the tasks ever served. Its single owner counts the items its own
transactions delete (``deletions``: an overwritten key counts too, it leaves a tombstone
as well) and, past ``REPLACE_AFTER``, rebuilds the document from its live entries
(``fresh``) and sends it as a new epoch: the tombstones go everywhere at once.
"""

from __future__ import annotations

import re
from typing import Any

from pycrdt import Array, Doc, Map, Text, TransactionEvent

from ..updates import UpdateError
from ..updates import delete_set as read_delete_set

REPLACE_AFTER = 500
"""Items an owner deletes in a document before it replaces it (protocol-v3.md §11: a
starting value). Each tombstone costs ~10-30 B in every copy, so a document carries at
most ~15 KB of them whatever the number of tasks."""

_EPOCH = re.compile(r"\bepoch (\d+)")


def deletions(delete_set: bytes) -> int:
    """How many items a transaction's delete set (Yjs v1 encoding: per client, ranges
    of clocks) deletes; 0 if it cannot be read."""
    try:
        ranges = read_delete_set(delete_set).values()
    except UpdateError:
        return 0
    return sum(length for client in ranges for _, length in client)


def deleted_by(event: TransactionEvent) -> int:
    """How many items the transaction of ``event`` deleted (pycrdt gives its delete set;
    its type stubs do not name it)."""
    raw = getattr(event, "delete_set", None)
    return deletions(raw) if isinstance(raw, bytes) else 0


def fresh(doc: Doc[Any]) -> Doc[Any]:
    """A new ``Doc`` (a new client id, no history) holding the live content of ``doc``,
    whose top-level types are maps (as every long-lived document's are)."""
    out: Doc[Any] = Doc()
    names = list(doc.keys())  # the roots (a Doc is not a mapping)
    roots = {name: dict(doc.get(name, type=Map).items()) for name in names}
    with out.transaction():
        for name, entries in roots.items():
            out.get(name, type=Map).update({k: _copy(v) for k, v in entries.items()})
    return out


def _copy(value: Any) -> Any:
    """A value to write in another ``Doc``: shared types as new ones, the rest as is."""
    if isinstance(value, Map):
        return Map({k: _copy(v) for k, v in value.items()})
    if isinstance(value, Array):
        return Array([_copy(v) for v in value])
    if isinstance(value, Text):
        return Text(str(value))
    if isinstance(value, bytearray):  # bytes as read back from Yjs
        return bytes(value)
    return value


def epoch_of(text: str) -> int | None:
    """The epoch a ``NOTICE`` 205 (replaced) names in its text (``"epoch N"``)."""
    m = _EPOCH.search(text)
    return int(m.group(1)) if m else None
