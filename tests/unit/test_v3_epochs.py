"""Epochs of long-lived documents (igora.v3.epochs, protocol-v3.md §9): counting an
owner's deletions, the fresh document that replaces one, and the market's own ``dir`` and
``who`` replaced by the same rule."""

from __future__ import annotations

import asyncio
from typing import Any

from pycrdt import Array, Doc, Map, Text

from igora.market.v3.market_docs import DIR, WHO, MarketDocs
from igora.v3.epochs import REPLACE_AFTER, deletions, epoch_of, fresh


def test_deletions_counts_the_items_a_transaction_deleted() -> None:
    doc: Doc[Any] = Doc()
    tasks = doc.get("tasks", type=Map)
    for i in range(10):
        tasks[str(i)] = {"i": i}
    counted: list[int] = []
    doc.observe(lambda event: counted.append(deletions(event.delete_set)))
    with doc.transaction():
        del tasks["1"]
        del tasks["3"]
        tasks["5"] = {"again": True}  # an overwrite leaves a tombstone too
    tasks["new"] = 1  # nothing deleted
    assert counted == [3, 0]
    assert deletions(b"\x01\xff") == 0  # not a delete set: nothing, no exception


def test_a_fresh_document_holds_the_live_entries_and_none_of_the_history() -> None:
    doc: Doc[Any] = Doc()
    tasks = doc.get("tasks", type=Map)
    for i in range(2_000):
        tasks[f"t{i}"] = {"header": "x" * 40, "n": i}
        if i % 100:
            del tasks[f"t{i}"]
    tasks["nested"] = Map({"grants": Map({"w": "sealed"}), "list": Array(["a", 1])})
    doc.get("other", type=Map)["text"] = Text("hello")
    tasks["blob"] = b"\x00\x01"
    new = fresh(doc)
    assert new.client_id != doc.client_id
    assert new.get("tasks", type=Map).to_py() == tasks.to_py()
    assert str(new.get("other", type=Map)["text"]) == "hello"
    assert isinstance(new.get("tasks", type=Map)["nested"]["grants"], Map)
    # the tombstones of 1,980 deleted entries are gone
    assert len(new.get_update()) * 10 < len(doc.get_update())
    # a reader applying the new state to a new Doc has the same entries
    reader: Doc[Any] = Doc()
    reader.apply_update(new.get_update())
    assert reader.get("tasks", type=Map).to_py() == tasks.to_py()


def test_epoch_of_reads_the_notice_text() -> None:
    assert epoch_of("replaced: epoch 1796019996827") == 1796019996827
    assert epoch_of("no number here") is None


def test_the_market_replaces_who_after_many_departures() -> None:
    async def main() -> None:
        emitted: list[tuple[str, bytes]] = []
        replaced: list[tuple[str, bytes]] = []
        docs = MarketDocs(
            {},
            lambda name, update: emitted.append((name, update)),
            "market-id",
            {},
            replace=lambda name, state: (
                replaced.append((name, state)),
                emitted.append(("new", b"")),
            ),
        )
        for i in range(REPLACE_AFTER + 50):
            docs.joined(f"agent{i}")
            if i % 50:
                docs.left(f"agent{i}")
            docs.flush()
        assert [name for name, _ in replaced] == [WHO]
        # The new epoch's state, read by a new reader, lists who is here now, and is a
        # fraction of the history it replaces.
        reader: Doc[Any] = Doc()
        reader.apply_update(replaced[0][1])
        here = {f"agent{i}" for i in range(0, REPLACE_AFTER + 50, 50)}
        present_then = set(reader.get("agents", type=Map).keys())
        assert present_then <= here and len(present_then) >= len(here) - 2
        assert set(docs.docs[WHO].get("agents", type=Map).keys()) == here
        assert DIR not in [name for name, _ in replaced]
        # Updates after the replace are of the new epoch: they apply on the new state.
        start = emitted.index(("new", b""))
        for name, update in emitted[start + 1 :]:
            if name == WHO:
                reader.apply_update(update)
        assert set(reader.get("agents", type=Map).keys()) == here
        docs.cancel()

    asyncio.run(main())
