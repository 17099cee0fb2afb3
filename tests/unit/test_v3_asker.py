"""The v3 asker's candidates (igora.v3.asker), without a market: drawn among the workers
of ``dir`` that serve the task, not busy, whose adverts check, from the latest ``dir``
(what is derived from it is kept until it changes)."""

from __future__ import annotations

from typing import Any

from nacl.signing import SigningKey
from pycrdt import Map

from igora.identity import Identity
from igora.protocol import PROTOCOL_VERSION, TaskField, new_task_id, now_ms
from igora.task_handle import Watch
from igora.v3 import advert
from igora.v3.asker import MAX_CANDIDATES, V3Asker
from igora.v3.session import Event, EventKind, Session

ASKER = Identity(SigningKey.generate())
READY = [Identity(SigningKey.generate()) for _ in range(3)]
BUSY, OTHER_MODEL = Identity(SigningKey.generate()), Identity(SigningKey.generate())


def _advert(worker: Identity, model: str = "m1", state: str = "ready") -> dict[str, Any]:
    models = [{"name": model}]
    return advert.make(
        worker, worker.session_key(), name="w", engine="echo", models=models, slots=2, state=state
    )


def _candidates(asker: V3Asker) -> set[str]:
    """The candidates in the header of a task put now."""
    tid = new_task_id()
    task = {
        TaskField.ID: tid,
        TaskField.PROTOCOL: PROTOCOL_VERSION,
        TaskField.MODEL: "m1",
        TaskField.PROMPT: "hi",
        TaskField.DATE: now_ms(),
        TaskField.DEADLINE: now_ms() + 60_000,
    }
    asker.submit(task, Watch(tid))
    return set(asker._tracks[tid].header.get("candidates") or ())


def test_candidates_are_drawn_among_the_fitting_workers_of_the_latest_dir() -> None:
    session = Session("ws://127.0.0.1:1/v3", ASKER)
    asker = V3Asker(session, ASKER)
    workers = session.docs["dir"].get("workers", type=Map)
    for w in READY:
        workers[w.id] = _advert(w)
    workers[BUSY.id] = _advert(BUSY, state="busy")
    workers[OTHER_MODEL.id] = _advert(OTHER_MODEL, model="m2")
    asker._on_event(Event(EventKind.CHANGED, "dir"))
    ready = {w.id for w in READY}
    drawn = [_candidates(asker) for _ in range(30)]
    assert all(len(c) == MAX_CANDIDATES and c <= ready for c in drawn)
    assert set().union(*drawn) == ready  # at random: not always the same first two
    # dir changes: two are busy now, the busy one is ready again
    for w in READY[:2]:
        workers[w.id] = _advert(w, state="busy")
    workers[BUSY.id] = _advert(BUSY)
    asker._on_event(Event(EventKind.CHANGED, "dir"))
    assert _candidates(asker) == {READY[2].id, BUSY.id}
    # an advert that does not check is no candidate
    workers[BUSY.id] = {**_advert(BUSY), "slots": 3}  # altered after its signature
    asker._on_event(Event(EventKind.CHANGED, "dir"))
    assert _candidates(asker) == {READY[2].id}
