"""A v3 document's update log and its way to the store (igora.market.v3.doclog), with
a real SQLite store in memory and pycrdt documents, no market."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from pycrdt import Doc, Map

from igora.market.store import Store
from igora.market.v3.doclog import MERGE_EVERY, DocHistory, DocLog


def _setting(doc: Doc[Any], key: str, value: Any) -> bytes:
    before = doc.get_state()
    doc.get("m", type=Map)[key] = value
    return doc.get_update(before)


def _content(update: bytes) -> dict[str, Any]:
    doc: Doc[Any] = Doc()
    doc.apply_update(update)
    return doc.get("m", type=Map).to_py() or {}


def test_a_log_merges_every_64_and_answers_state_vectors() -> None:
    source: Doc[Any] = Doc()
    log = DocLog()
    for i in range(MERGE_EVERY + 3):
        log.append(_setting(source, f"k{i}", i))
    assert len(log.entries) == 4  # merged once at 64, then three more
    assert _content(log.state()) == {f"k{i}": i for i in range(MERGE_EVERY + 3)}
    assert len(log.entries) == 1
    reader: Doc[Any] = Doc()
    reader.apply_update(log.diff(b"\x00"))
    half = reader.get_state()
    more = _setting(source, "late", True)
    log.append(more)
    assert _content(log.diff(half)) == {"late": True}  # only what the reader lacks
    assert log.vector() == source.get_state()


def _history(store: Store, room: str = "r") -> DocHistory:
    history = DocHistory(room, store)
    history.load()
    return history


async def _write(history: DocHistory, name: str, update: bytes) -> None:
    doc = history.logs.setdefault(name, DocLog())
    doc.append(update)
    history.appended(name, update)


async def test_stored_logs_come_back_squashed_and_a_dropped_name_starts_afresh() -> None:
    store = Store(":memory:")
    history = _history(store)
    source: Doc[Any] = Doc()
    for i in range(150):
        await _write(history, "a/x", _setting(source, f"k{i}", i))
    await _write(history, "p/x/t", _setting(Doc(), "old", 1))
    await history.flush()
    rows = store.load_documents("r")
    assert len(rows["a/x"]) <= MERGE_EVERY  # replaced by the merged state on the way
    history.logs.pop("p/x/t")
    history.drop("p/x/t")
    await _write(history, "p/x/t", _setting(Doc(), "new", 2))  # before the flush
    await history.flush()
    again = _history(store)
    assert _content(again.logs["a/x"].state()) == {f"k{i}": i for i in range(150)}
    assert _content(again.logs["p/x/t"].state()) == {"new": 2}
    assert all(len(v) == 1 for v in store.load_documents("r").values())  # squashed at load
    again.logs.pop("p/x/t")
    again.drop("p/x/t")
    await asyncio.wait_for(again.flush(), 5)
    assert set(store.load_documents("r")) == {"a/x"}
    assert store.load_documents("other") == {}


def test_an_owners_bytes_follow_its_logs_through_appends_merges_and_drops() -> None:
    """The per-identity limit reads ``owned``: it must equal the sizes of the logs each
    identity owns whatever happened to them (merges shrink a long-lived log that
    deletes, reads merge too), and nothing once they are all disowned."""
    owned: Counter[str] = Counter()
    sources: dict[str, Doc[Any]] = {}
    logs: dict[str, DocLog] = {}
    for name, owner, collect in (("a/x", "x", True), ("p/x/t", "x", False), ("w/y", "y", True)):
        sources[name] = Doc()
        logs[name] = DocLog(collect=collect)
        logs[name].own(owner, owned)

    def matches() -> bool:
        want = Counter({"x": logs["a/x"].size + logs["p/x/t"].size, "y": logs["w/y"].size})
        return +owned == +want

    for i in range(3 * MERGE_EVERY + 5):
        for name, log in logs.items():
            source = sources[name]
            log.append(_setting(source, f"k{i % 7}", "v" * (i % 50)))  # rewrites: merges shrink
            if i % 5 == 0:
                with source.transaction():
                    source.get("m", type=Map).pop(f"k{(i + 3) % 7}", None)
                log.append(source.get_update(log.vector()))
        if i % 17 == 0:
            logs["a/x"].state()  # a read merges, and resizes
        assert matches(), (i, owned)
    for log in logs.values():
        log.disown()
        log.disown()  # twice: counted off once
    assert owned == Counter()
