"""The asker's role in a v3 room (docs/protocol-v3.md §7.2 steps 1, 3, 7, 9; §7.3):
what ``igora.Client`` runs when the room speaks version 3.

A task is the signed header in ``a/<own id>.tasks[tid]`` and the prompt document
``p/<own id>/<tid>`` (the request in clear in ``pt`` until step 4 encrypts it). The
asker reads its inbox ``in/<own id>``: the broker's status names the worker and the
attempt, and the broker attaches the run document ``r/<worker>/<tid>.<n>``, whose
``chunks`` feed the task's ``Watch`` as v2's streams do and whose ``run`` state ends it;
a status ``failed`` or ``aborted`` ends it too. A new attempt restarts the answer (the
``Restart`` marker). Abort marks ``p/…abort`` (the worker) and ``a/….aborts`` (the
broker). Once the answer is read the header is deleted, the prompt document dropped and
the run unsubscribed; the broker then cleans the inboxes and the worker drops its run.
The receipt (``p/….receipts``) is step 7's.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from pycrdt import Array, Map

from ..capabilities import required
from ..identity import Identity
from ..protocol import Peer, TaskField, now_ms, number
from ..task_handle import Watch
from .header import sign_header
from .session import Event, EventKind, Session
from .tasks import (
    ABORT,
    ABORTS,
    ANY_MODEL,
    CHUNKS,
    FINAL_RUNS,
    PLAINTEXT,
    PROMPT,
    RESULTS,
    RUN,
    TASKS,
    Header,
    RunField,
    Status,
    StatusState,
    asker_doc,
    inbox,
    prompt_doc,
    run_doc,
)

log = logging.getLogger("igora.client")


@dataclass
class Track:
    """Where the answer of one task is read from."""

    watch: Watch
    task: dict[str, Any]
    worker: str | None = None
    attempt: int = 0
    read: int = 0  # chunks of the current attempt's run fed to the watch


class V3Asker:
    """Puts tasks in a v3 room and reads their answers, for ``identity``."""

    def __init__(self, session: Session, identity: Identity) -> None:
        self.session = session
        self.identity = identity
        self.id = identity.id
        self._asker = session.own(asker_doc(self.id))
        self._inbox = session.subscribe(inbox(self.id))
        self._dir = session.subscribe("dir")
        self._tracks: dict[str, Track] = {}
        self._ended: set[str] = set()
        session.observe(self._on_event)

    # ------------------------------------------------------------------ the market
    def workers(self) -> list[Peer]:
        """The workers advertised in ``dir`` (as the v2 policies see them)."""
        from .broker import worker_peer  # the one place that maps an advert to a Peer

        if self._dir is None:
            return []
        raw = dict(self._dir.get("workers", type=Map).items())
        return [worker_peer(a) for a in raw.values() if isinstance(a, dict) and "id" in a]

    @property
    def tracking(self) -> list[str]:
        """The tasks whose answer is not read yet."""
        return list(self._tracks)

    def worker_of(self, tid: str) -> str | None:
        track = self._tracks.get(tid)
        return track.worker if track else None

    # ------------------------------------------------------------------ tasks
    def submit(self, task: dict[str, Any], watch: Watch) -> None:
        """Put ``task`` (a v2 task, validated) on the market; its answer feeds ``watch``."""
        tid = task[TaskField.ID]
        fields = {
            Header.ID: tid,
            Header.MODEL: task.get(TaskField.MODEL) or ANY_MODEL,
            Header.MAX_TOKENS: task.get(TaskField.MAX_TOKENS),
            Header.PROMPT_BYTES: len(json.dumps(task, ensure_ascii=False).encode()),
            Header.DATE: task[TaskField.DATE],
            Header.DEADLINE: task[TaskField.DEADLINE],
            Header.NEEDS: sorted(required(task)),
        }
        header = sign_header(self.identity, {k: v for k, v in fields.items() if v is not None})
        self._tracks[tid] = Track(watch, task)
        prompt = self.session.own(prompt_doc(self.id, tid))
        prompt.get(PROMPT, type=Map)[PLAINTEXT] = task
        self._asker.get(TASKS, type=Map)[tid] = header

    def abort(self, tid: str) -> None:
        """Ask the worker (``p/…abort``) and the broker (``a/….aborts``) to stop it."""
        if tid not in self._tracks or tid in self._ended:
            return
        self.session.own(prompt_doc(self.id, tid)).get(PROMPT, type=Map)[ABORT] = True
        self._asker.get(ABORTS, type=Map)[tid] = True

    def forget(self, tid: str) -> None:
        """The answer was read (or given up): the task's documents and entries go."""
        track = self._tracks.pop(tid, None)
        self._ended.discard(tid)
        with self._asker.transaction():
            for key in (TASKS, ABORTS):
                entries = self._asker.get(key, type=Map)
                if tid in entries:
                    del entries[tid]
        name = prompt_doc(self.id, tid)
        if name in self.session.docs:
            self.session.drop(name)
        if track is not None and track.worker:
            run = run_doc(track.worker, tid, track.attempt)
            if run in self.session.docs:
                self.session.unsubscribe(run)

    # ------------------------------------------------------------------ reading
    def _on_event(self, event: Event) -> None:
        if event.kind is not EventKind.CHANGED and event.kind is not EventKind.NEW:
            return
        name = event.name
        if name == inbox(self.id):
            for tid in list(self._tracks):
                self._status(tid)
        elif name.startswith("r/"):
            tid = name.split("/")[2].partition(".")[0]
            if tid in self._tracks:
                self._run(tid)

    def _status(self, tid: str) -> None:
        track = self._tracks[tid]
        if tid in self._ended or self._inbox is None:
            return
        status = self._inbox.get(TASKS, type=Map).get(tid)
        if not isinstance(status, dict):
            return
        state = status.get(Status.STATE)
        attempt = int(number(status.get(Status.ATTEMPT)) or 0)
        if state == StatusState.ASSIGNED.value and attempt > track.attempt:
            worker = status.get(Status.WORKER)
            if not isinstance(worker, str):
                return
            if track.worker:  # the previous attempt's run is read no more
                old = run_doc(track.worker, tid, track.attempt)
                if old in self.session.docs:
                    self.session.unsubscribe(old)
            track.worker, track.attempt, track.read = worker, attempt, 0
            track.watch.feed(attempt, "")
            self._run(tid)
        elif state in (StatusState.FAILED.value, StatusState.ABORTED.value):
            final = {
                **track.task,
                TaskField.STATE: state,
                TaskField.ERROR: status.get(Status.ERROR),
                TaskField.ERROR_CODE: status.get(Status.ERROR_CODE),
                TaskField.END: status.get(Status.END) or now_ms(),
                TaskField.RESPONSE: track.watch.delivered,
            }
            self._end(tid, track, final)

    def _run(self, tid: str) -> None:
        track = self._tracks[tid]
        if tid in self._ended or not track.worker:
            return
        doc = self.session.docs.get(run_doc(track.worker, tid, track.attempt))
        if doc is None:
            return
        chunks = doc.get(CHUNKS, type=Array)
        size = len(chunks)
        if size > track.read:
            pieces = [chunks[i] for i in range(track.read, size)]
            track.read = size
            track.watch.feed(track.attempt, "".join(p for p in pieces if isinstance(p, str)))
        run = doc.get(RUN, type=Map)
        state = run.get(RunField.STATE)
        if state not in FINAL_RUNS:
            return
        final = {**track.task, TaskField.STATE: state, TaskField.WORKER: track.worker}
        for field in (*RESULTS, RunField.ERROR, RunField.ERROR_CODE, RunField.END):
            value = run.get(field)
            if value is not None:
                final[field] = value
        final[TaskField.RESPONSE] = track.watch.delivered
        self._end(tid, track, final)

    def _end(self, tid: str, track: Track, final: dict[str, Any]) -> None:
        self._ended.add(tid)
        track.watch.ended = True
        track.watch.queue.put_nowait(final)
