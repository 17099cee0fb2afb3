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


class _Replicas:
    """Two replicas' MarketDocs of one room, their dir updates exchanged by hand."""

    def __init__(self) -> None:
        self.out: dict[str, list[bytes]] = {"a": [], "b": []}
        self.docs = {r: self._docs(r) for r in self.out}

    def _docs(self, replica: str) -> MarketDocs:
        def emit(name: str, update: bytes) -> None:
            if name == DIR:
                self.out[replica].append(update)

        return MarketDocs({}, emit, "market-id", {}, replica=replica)

    def exchange(self) -> None:
        """Flush both and take each one's updates to the other until neither writes."""
        for _ in range(10):  # a write is answered at most once: a few rounds
            for docs in self.docs.values():
                docs.flush()
            if not any(self.out.values()):
                return
            sent = {r: list(updates) for r, updates in self.out.items()}
            for updates in self.out.values():
                updates.clear()
            for r, updates in sent.items():
                for update in updates:
                    self.docs["b" if r == "a" else "a"].apply(DIR, update)
        raise AssertionError("the replicas kept writing dir.broker")


def test_replicas_writing_the_broker_at_once_end_on_the_newer_epoch() -> None:
    """One replica frees the lease (its broker left) while another takes it with the
    next epoch, each writing dir.broker before it saw the other's write. Yjs keeps one
    of two concurrent writes by client id, not by epoch; whichever it keeps, both
    replicas end showing the newer holder and epoch (a failed CI run saw the third
    replica of a test keep the older)."""

    async def main() -> None:
        for older_wins_the_merge in (True, False):
            room = _Replicas()
            room.exchange()
            # Yjs keeps the write of the higher client id: give that one the older epoch.
            a, b = room.docs["a"], room.docs["b"]
            a_higher = a.docs[DIR].client_id > b.docs[DIR].client_id
            freeing, taking = (a, b) if a_higher == older_wins_the_merge else (b, a)
            freeing.broker("broker-2", 1)
            room.exchange()
            freeing.broker(None, 1)  # broker-2 left: the lease is free
            taking.broker("broker-1", 2)  # at once, the next epoch, elsewhere
            room.exchange()
            for docs in (a, b):
                assert docs.broker_view() == {"id": "broker-1", "epoch": 2}
                docs.cancel()

    asyncio.run(main())
