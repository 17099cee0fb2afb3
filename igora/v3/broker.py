"""The broker's role in a v3 room (docs/protocol-v3.md §5, §7.2 step 2, §7.3).

It asks for the lease (``CONTROL lease``) and, while it holds it, reads every asker's
headers (``a/`` by prefix), every worker's runs (``w/``), the inboxes it or a previous
holder wrote (``in/``), the adverts (``dir.workers``) and who is present (``who``). Each
turn it decides per task (``igora.v3.flow.decide``) and matches the waiting tasks with
version 2's policies (``igora.broker.fairness`` for the order, ``igora.broker.matching``
for the worker: model, capabilities, free slots), the order put under the askers'
standing (``igora.broker.standing``: richer askers first, with ageing, from the market's
``standing`` document; an asker at zero has at most ``poor_concurrency`` tasks running).
An assignment goes out as one turn: the worker's inbox entry, the asker's status, and the
two attaches (the prompt to the worker, the run to the asker). On gaining the lease it
attaches again every live task's documents (the market keeps attachments in memory
only). When an asker deletes a header (it read the answer) the broker removes both inbox
entries, with its next write to each inbox (or after ``LINGER``). It also writes the
room's ``board`` (``igora.v3.board``): counts and the last tasks, nothing of their text.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from typing import Any

from pycrdt import Doc, Map

from ..broker import standing
from ..broker.fairness import Fairness
from ..broker.matching import Kind, free_slots, pick_for
from ..broker.presence import RECONNECT_ALLOWANCE
from ..broker.unservable import Unservables
from ..capabilities import Unservable, fits, unservable_kind
from ..protocol import (
    PROTOCOL_VERSION,
    TEXT_STYLE,
    AgentField,
    AgentType,
    ErrorCode,
    Peer,
    now_ms,
    number,
)
from . import advert as adverts
from .board import BOARD, SUMMARY, BoardKeeper
from .board import row as board_row
from .documents import TASK_ID
from .flow import (
    DEFAULT_CLAIM_TIMEOUT,
    DEFAULT_MAX_ATTEMPTS,
    Act,
    Decision,
    View,
    assignment,
    decide,
    ended,
    waiting,
)
from .flow import assigned as assigned_status
from .header import HeaderError, verify_header
from .session import EventKind, Session
from .signed import SignatureError, plain
from .tasks import (
    ABORTS,
    ANY_MODEL,
    FINAL_RUNS,
    RUNS,
    TASKS,
    Assignment,
    Header,
    RunField,
    Status,
    StatusState,
    inbox,
    prompt_doc,
    run_doc,
    run_key,
)
from .wire import MAX_NAMES, Code

log = logging.getLogger("igora.broker")

TICK = 0.1  # seconds between two looks when nothing wakes the broker
TURN_GAP = 1.0  # the pause after a turn, as a multiple of the time that turn took
MAX_TURN_GAP = 0.02  # seconds: the longest such pause
SETTLE = 1.0  # seconds after the lease before entries are cleaned up (the prefixes' state arrives)
NEW_ASKER = 5.0  # seconds a header's asker counts as present before who lists it
LINGER = 1.0
"""Seconds an ended task's inbox entries may wait to be deleted with the next write to
that inbox (protocol-v3.md §7.2 step 10): an asker in a closed loop then gets its next
assignment and the previous task's deletion in one update, one frame, one apply."""
_EPOCH = re.compile(r"epoch (\d+)")


def worker_peer(advert: dict[str, Any]) -> Peer:
    """A worker's advert seen as the v2 policies see a worker (``igora.broker.matching``)."""
    return Peer(
        0,
        {
            AgentField.ID: advert["id"],
            AgentField.TYPE: AgentType.WORKER.value,
            AgentField.NAME: advert.get("name"),
            AgentField.MODELS: advert.get("models"),
            AgentField.SLOTS: advert.get("slots"),
            AgentField.STATE: "busy" if advert.get("state") == "busy" else "ready",
            AgentField.PROTOCOL: PROTOCOL_VERSION,
            AgentField.STYLE: TEXT_STYLE,
        },
    )


class V3Broker:
    """Routes the tasks of the room of ``session`` while it holds the broker lease."""

    def __init__(
        self,
        session: Session,
        *,
        claim_timeout: float = DEFAULT_CLAIM_TIMEOUT,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        poor_concurrency: int = standing.DEFAULT_POOR_CONCURRENCY,
    ) -> None:
        self.session = session
        self.poor_concurrency = poor_concurrency
        self.claim_timeout = claim_timeout
        self.max_attempts = max_attempts
        self.epoch = 0
        self.fairness = Fairness()
        self.assigned = 0
        self._leased_at: float | None = None
        # tid -> (the header as read, as verified): an asker's document is read again at
        # each change, and holds all its tasks in flight (a gateway's: hundreds)
        self._verified: dict[str, tuple[Any, dict[str, Any]]] = {}
        self._keys: dict[str, tuple[tuple[str, int], Any]] = {}  # tid -> ``_key_given``
        self._refused: set[str] = set()  # tids whose header did not verify (logged once)
        self._handed_back: dict[str, set[str]] = {}  # tid -> workers whose engine failed it
        # tid -> (since, inboxes still holding its entries): tasks whose header left
        self._leaving: dict[str, tuple[float, set[str]]] = {}
        self._adverts: dict[str, tuple[dict[str, Any], Peer]] = {}  # id -> advert checked
        # a map of a document as read, with the Doc it was read from: read again only
        # once the document changed (``_stale``) or its Doc is another
        self._read: dict[tuple[str, str], tuple[Doc[Any], dict[str, Any]]] = {}
        self._asker_headers: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
        # tid -> (status, run, its board row): made again only when one of them changed
        self._rows: dict[str, tuple[Any, Any, dict[str, Any]]] = {}
        self._turn: contextlib.ExitStack | None = None  # a turn's open transactions
        self._writing: set[str] = set()  # inboxes with a transaction open this turn
        self._attaches: dict[str, list[str]] = {}  # to -> documents, sent at the turn's end
        self.board = BoardKeeper(now_ms())
        self._unservables = Unservables()  # tasks no worker present serves, judged
        self._view = 0  # changes when the workers present or their adverts do
        self._seen: tuple[tuple[str, str], ...] = ()
        self._wake = asyncio.Event()
        for prefix in ("a/", "w/", "in/"):
            session.subscribe(prefix, prefix=True)
        session.subscribe("dir")
        session.subscribe("who")
        session.subscribe("standing")
        # owned from the start: the step 1 exchange that follows each lease grant brings
        # the market's copy (a previous holder's summary) before this broker writes
        session.own(BOARD)
        session.observe(self._on_event)

    @property
    def leader(self) -> bool:
        return self.session.lease

    def _on_event(self, event: Any) -> None:
        if event.name:
            self._stale(event.name)
        if event.kind is EventKind.CONNECTED:
            self._leased_at = None
            self.session.control({"op": "lease"})
        elif event.kind is EventKind.NOTICE and event.code == Code.LEASE_GRANTED:
            m = _EPOCH.search(event.text)
            self.epoch = int(m.group(1)) if m else self.epoch + 1
            self._leased_at = time.monotonic()
            self.board = BoardKeeper(now_ms(), self.epoch)  # counts since this lease
            log.info("broker: lease granted, epoch %d", self.epoch)
            self._reattach()
        self._wake.set()

    async def run(self) -> None:
        self.session.control({"op": "lease"})
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            spent = 0.0
            if self.session.lease:
                start = loop.time()
                try:
                    self.step()
                except Exception:  # a bug on one entry must not stop the broker
                    log.exception("broker: a turn failed")
                spent = loop.time() - start
            tick = loop.call_later(TICK, self._wake.set)
            await self._wake.wait()
            tick.cancel()
            # A turn looks at every task in flight and a busy room wakes the broker at
            # each message: as long again as the last turn took lets the messages of
            # that time gather into the next turn (at most half the broker's time in
            # turns, however many tasks are in flight; a turn of a quiet room is short)
            await asyncio.sleep(min(spent * TURN_GAP, MAX_TURN_GAP))

    # ------------------------------------------------------------------ reading
    def _map(self, name: str, key: str) -> dict[str, Any]:
        """A map of a document as a dict (never to be changed: it is shared). Read again
        only when the document changed since: the market's updates (an event names the
        document) and this broker's writes to an inbox (``_inbox``) mark it stale, so a
        turn no longer converts every asker's and worker's document (O(agents) per
        turn, and a turn per message received)."""
        doc = self.session.docs.get(name)
        if doc is None:
            return {}
        known = self._read.get((name, key))
        if known is not None and known[0] is doc:
            return known[1]
        out = dict(doc.get(key, type=Map).items())
        self._read[name, key] = (doc, out)
        return out

    def _stale(self, name: str) -> None:
        """``name`` changed: its maps are read again when next needed."""
        for key in (TASKS, RUNS, ABORTS, "agents", "workers", "askers"):
            self._read.pop((name, key), None)

    def _present(self) -> set[str]:
        return set(self._map("who", "agents"))

    def _workers(self, present: set[str]) -> dict[str, Peer]:
        workers = {}
        listed = self._map("dir", "workers")
        for id_ in [i for i in self._adverts if i not in listed]:
            del self._adverts[id_]
        for id_, raw in listed.items():
            if id_ not in present or not isinstance(raw, dict):
                continue
            known = self._adverts.get(id_)
            if known is not None and known[0] == raw:  # checked already: two signatures
                workers[id_] = known[1]
                continue
            try:
                checked = adverts.check(raw)
            except adverts.AdvertError as exc:
                log.warning("broker: advert of %s ignored: %s", id_[:8], exc)
                continue
            if checked.get("id") == id_:
                workers[id_] = worker_peer(checked)
                self._adverts[id_] = (raw, workers[id_])
        return workers

    def _headers(self) -> dict[str, dict[str, Any]]:
        """Every verified header, by task id; an asker's document is looked at again
        only when it changed."""
        headers: dict[str, dict[str, Any]] = {}
        for name in [n for n in self.session.docs if n.startswith("a/")]:
            raw_tasks = self._map(name, TASKS)
            known = self._asker_headers.get(name)
            if known is not None and known[0] is raw_tasks:  # as read at a previous turn
                headers.update(known[1])
                continue
            mine = self._asker_headers_of(name, raw_tasks)
            self._asker_headers[name] = (raw_tasks, mine)
            headers.update(mine)
        for name in [n for n in self._asker_headers if n not in self.session.docs]:
            del self._asker_headers[name]
        return headers

    def _asker_headers_of(self, name: str, raw_tasks: dict[str, Any]) -> dict[str, Any]:
        """The verified headers of one asker's document."""
        headers: dict[str, dict[str, Any]] = {}
        asker = name[2:]
        for tid, raw in raw_tasks.items():
            known = self._verified.get(tid)
            if known is not None and known[0] == raw and known[1].get(Header.ASKER) == asker:
                headers[tid] = known[1]  # the same content in its asker's document: verified
                continue
            try:  # numbers come back from Yjs as floats: as signed, first
                header = plain(raw) if isinstance(raw, dict) else None
            except SignatureError:
                header = None
            if header is None:
                continue
            try:
                verify_header(header)
                if header.get(Header.ID) != tid or header.get(Header.ASKER) != asker:
                    raise HeaderError("its id or asker is not where it was written")
            except HeaderError as exc:
                if tid not in self._refused:
                    self._refused.add(tid)
                    log.warning("broker: task %s of %s refused: %s", tid, asker[:8], exc)
                    if TASK_ID.fullmatch(tid) and tid not in self._map(inbox(asker), TASKS):
                        self._inbox(asker)[tid] = ended(
                            StatusState.FAILED,
                            self.epoch,
                            now_ms(),
                            ErrorCode.INVALID_TASK,
                            f"task {tid} refused: {exc}",
                            0,
                        )
                continue
            self._verified[tid] = (raw, header)
            headers[tid] = header
        return headers

    # ------------------------------------------------------------------ a turn
    def step(self) -> None:
        """Decide for every task, write what changes: one turn. What it writes to an
        inbox goes out as one update per inbox (one transaction each, committed at the
        turn's end), and its attaches as one ``CONTROL attach`` per agent, after them."""
        with contextlib.ExitStack() as turn:
            self._turn = turn
            try:
                self._step()
            finally:
                self._turn = None
                self._writing.clear()
        self._send_attaches()

    def _send_attaches(self) -> None:
        attaches, self._attaches = self._attaches, {}
        for to, docs in attaches.items():
            for i in range(0, len(docs), MAX_NAMES):
                self.session.control({"op": "attach", "to": to, "docs": docs[i : i + MAX_NAMES]})

    def _step(self) -> None:
        now = now_ms()
        present = self._present()
        workers = self._workers(present)
        headers = self._headers()
        statuses: dict[str, tuple[str, dict[str, Any]]] = {}  # tid -> (asker, status)
        for name in [n for n in self.session.docs if n.startswith("in/")]:
            for tid, value in self._map(name, TASKS).items():
                if isinstance(value, dict) and Status.STATE in value:
                    statuses[tid] = (name[3:], value)
        for tid in self.board.live.keys() - headers.keys():
            # its asker read the end (and deleted the header), perhaps in the batch the
            # run ended in: its last row, with the run as it ended
            last = statuses.get(tid, ("", {}))[1]
            self.board.gone(tid, self.board.live[tid], self._run_of(tid, last), last)
        leased_for = time.monotonic() - (self._leased_at or time.monotonic())
        if self._leased_at is not None and leased_for > SETTLE:
            self._cleanup(headers, statuses)  # before this turn's writes: statuses are as read
        # After a lease grant (a market restart: everyone reconnects), an agent missing
        # from who may still be in its reconnect back-off: nobody is judged gone until it
        # had the time to come back, as the v2 broker does (docs/faults.md).
        rejoining = leased_for < RECONNECT_ALLOWANCE
        load: dict[str, int] = {}
        in_flight: dict[str, int] = {}
        runs: dict[str, dict[str, Any]] = {}
        matching: list[dict[str, Any]] = []
        keys = {i: str(self._adverts[i][0].get("encKey")) for i in workers}
        attempts: dict[str, int] = {}
        rows: dict[str, dict[str, Any]] = {}
        for tid, header in headers.items():
            asker = str(header[Header.ASKER])
            status = statuses.get(tid, ("", None))[1]
            worker = (status or {}).get(Status.WORKER)
            n = int(number((status or {}).get(Status.ATTEMPT)) or 0)
            run = None
            if (
                isinstance(worker, str)
                and (status or {}).get(Status.STATE) == StatusState.ASSIGNED.value
            ):
                run = self._run_of(tid, status or {})
                runs[tid] = run or {}
            rows[tid] = self._row(tid, header, status, run)
            aborted = bool(self._map(f"a/{asker}", ABORTS).get(tid))
            # who is coalesced (50 ms): a header may come before its asker is in it
            date = number(header.get(Header.DATE)) or 0
            here = asker in present or rejoining or now - date < NEW_ASKER * 1000
            restarted = False
            if isinstance(worker, str) and worker in keys:
                key = self._key_given(worker, tid, n)
                restarted = isinstance(key, str) and key != keys[worker]
            view = View(
                header, status, aborted, run, worker in present or rejoining, here, now, restarted
            )
            d = decide(view, claim_timeout=self.claim_timeout, max_attempts=self.max_attempts)
            if d.act is Act.MATCH:
                matching.append(header)
                attempts[tid] = d.attempt
            elif d.act is Act.REQUEUE and not self._another(header, str(worker), d, workers):
                # v2's rule: a task handed back goes to another worker only if one that
                # is not busy serves it; else it fails now with the engine's reason.
                error = str((run or {}).get(RunField.ERROR) or d.error)
                log.info("broker: task %s failed: %s", tid, error)
                self._end(
                    tid, asker, worker, n, StatusState.FAILED, ErrorCode.ENGINE_UNAVAILABLE, error
                )
            elif d.act is Act.REQUEUE:
                if d.code is ErrorCode.ENGINE_UNAVAILABLE:  # not to it again (its advert lags)
                    self._handed_back.setdefault(tid, set()).add(str(worker))
                log.info("broker: task %s re-queued: %s", tid, d.error)
                self._take_back(tid, asker, str(worker), n)
            elif d.act is Act.FAIL:
                assert d.code is not None
                log.info("broker: task %s failed: %s", tid, d.error)
                self._end(tid, asker, worker, n, StatusState.FAILED, d.code, d.error)
            elif d.act is Act.ABORT:
                self._end(tid, asker, worker, n, StatusState.ABORTED, ErrorCode.ABORTED, "aborted")
            elif (
                isinstance(worker, str)
                and (status or {}).get(Status.STATE) == StatusState.ASSIGNED.value
                and (run or {}).get(RunField.STATE) not in FINAL_RUNS
            ):
                load[worker] = load.get(worker, 0) + 1
                in_flight[asker] = in_flight.get(asker, 0) + 1
        if len(self._rows) > len(headers):  # rows of the tasks whose header left
            for tid in self._rows.keys() - headers.keys():
                del self._rows[tid]
        matching = self._unservable(matching, attempts, workers)
        if matching:
            self._match(matching, attempts, workers, load, in_flight, now)
        self._sweep()
        self.board.turn(rows)
        self._write_board()

    def _row(
        self,
        tid: str,
        header: dict[str, Any],
        status: dict[str, Any] | None,
        run: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """A task's board row, as of this turn's reads (a header does not change)."""
        known = self._rows.get(tid)
        if known is not None and known[0] == status and known[1] == run:
            return known[2]
        made = board_row(header, status, run)
        self._rows[tid] = (status, run, made)
        return made

    def _write_board(self) -> None:
        """The board's summary, when due (``BoardKeeper.due``), once ``SETTLE`` s passed
        since the lease: by then the market's copy (a previous holder's, sent back for the
        step 1 that follows the grant) has reached this session's ``Doc``, so this write
        replaces it rather than racing it (of two concurrent writes of one map key, the
        higher client id's stays until the next write)."""
        if self._leased_at is None or time.monotonic() - self._leased_at <= SETTLE:
            return
        summary = self.board.due(now_ms(), time.monotonic())
        if summary is not None:
            self.session.own(BOARD).get(BOARD, type=Map)[SUMMARY] = summary

    def _key_given(self, worker: str, tid: str, n: int) -> Any:
        """The worker's session key that attempt ``n`` of ``tid`` was assigned under, as
        its entry in ``worker``'s inbox says (read once per attempt, not at every turn:
        an entry is written whole by one lease holder, with its key, and later changed
        only to add ``abort``)."""
        known = self._keys.get(tid)
        if known is not None and known[0] == (worker, n):
            return known[1]
        doc = self.session.docs.get(inbox(worker))
        entry = None if doc is None else doc.get(TASKS, type=Map).get(tid)
        if not isinstance(entry, dict):
            return None
        key = entry.get(Assignment.KEY)
        if number(entry.get(Assignment.ATTEMPT)) == n:
            self._keys[tid] = ((worker, n), key)
        return key

    def _unservable(
        self, waiting: list[dict[str, Any]], attempts: dict[str, int], workers: dict[str, Peer]
    ) -> list[dict[str, Any]]:
        """End ``failed`` the tasks never assigned that no worker present could serve
        (its model, what it needs), as v2's broker does (``igora.broker.unservable``, the
        same codes); the rest. Judged while some worker is present, once the lease is
        held for a while (the adverts arrive after a restart)."""
        settled = self._leased_at is not None and time.monotonic() - self._leased_at > SETTLE
        if not workers or not settled:
            return waiting
        seen = tuple(sorted((i, str(self._adverts[i][0].get("sig"))) for i in workers))
        if seen != self._seen:
            self._seen, self._view = seen, self._view + 1
        never = [h for h in waiting if attempts[str(h[Header.ID])] == 1]
        failures, _ = self._unservables.judge(
            never, list(workers.values()), self._view, time.monotonic(), _unservable
        )
        failed = set()
        for header, why in failures:
            tid = str(header[Header.ID])
            log.info("broker: task %s failed: %s", tid, why.reason)
            asker = str(header[Header.ASKER])
            self._end(tid, asker, None, 0, StatusState.FAILED, why.code, why.reason)
            failed.add(tid)
        return [h for h in waiting if str(h[Header.ID]) not in failed]

    def _match(
        self,
        tasks: list[dict[str, Any]],
        attempts: dict[str, int],
        workers: dict[str, Peer],
        load: dict[str, int],
        in_flight: dict[str, int],
        now: int,
    ) -> None:
        pool = [w for w in workers.values() if free_slots(w, load) > 0]
        if not pool:  # every slot taken (most turns of a busy room): nothing to order
            return
        buckets = {
            k: int(v) for k, v in self._map("standing", "askers").items() if number(v) is not None
        }
        # Within a turn slots only fill up: once no worker has one, or none of a kind's
        # workers had one, the other waiting tasks (of that kind) need not be tried
        # (with 100 tasks waiting that was most of a turn).
        full: set[Kind] = set()
        for header in standing.order(tasks, buckets, now, self.fairness, in_flight):
            pool = [w for w in pool if free_slots(w, load) > 0]
            if not pool:
                break
            asker = str(header[Header.ASKER])
            if asker in buckets and not standing.may_queue(
                buckets[asker], in_flight.get(asker, 0), self.poor_concurrency
            ):
                continue  # an asker at zero: one task at a time (credits.md §1)
            kind = _kind(header)
            tried = self._handed_back.get(str(header[Header.ID]))
            if not tried and kind in full:
                continue
            fit = [w for w in pool if w.id not in tried] if tried else pool
            # the candidates first (they have grants); another only if none is free:
            # the asker then grants it late (protocol-v3.md §7.2), unless the header
            # says only the candidates (its asker's trusted workers: security.md §6)
            named = header.get(Header.CANDIDATES)
            granted = set(named) if isinstance(named, list) else set()
            worker = pick_for(kind, [w for w in fit if w.id in granted], load)
            only = header.get(Header.CANDIDATES_ONLY) is True
            if worker is None and not only:
                worker = pick_for(kind, fit, load)
            if worker is None or worker.id is None:
                if not tried and not only:  # none of its candidates free: others may be
                    full.add(kind)
                continue
            tid, n = str(header[Header.ID]), attempts[str(header[Header.ID])]
            self._assign(tid, asker, worker.id, header, n, now)
            load[worker.id] = load.get(worker.id, 0) + 1
            in_flight[asker] = in_flight.get(asker, 0) + 1
            self.fairness.record(header)

    def _run_of(self, tid: str, status: dict[str, Any]) -> dict[str, Any] | None:
        """The entry in ``w/<worker>.runs`` of the attempt a status names, if any."""
        worker = status.get(Status.WORKER)
        if not isinstance(worker, str):
            return None
        n = int(number(status.get(Status.ATTEMPT)) or 0)
        raw = self._map(f"w/{worker}", RUNS).get(run_key(tid, n))
        return raw if isinstance(raw, dict) else None

    def _another(
        self, header: dict[str, Any], worker: str, d: Decision, workers: dict[str, Peer]
    ) -> bool:
        """Whether a task taken back from ``worker`` may wait for another: always, unless
        it was handed back (its engine is down) and no other worker that is not busy
        serves it."""
        if d.code is not ErrorCode.ENGINE_UNAVAILABLE:
            return True
        model, needs = _kind(header)[:2]
        tried = self._handed_back.get(str(header[Header.ID]), set()) | {worker}
        return any(
            id_ not in tried and fits(w, model, needs) and free_slots(w, {}) > 0
            for id_, w in workers.items()
        )

    # ------------------------------------------------------------------ writing
    def _inbox(self, agent: str) -> Map[Any]:
        """The tasks of ``agent``'s inbox, to write: its read is stale from now on, and
        during a turn its transaction stays open until the turn's end."""
        name = inbox(agent)
        doc = self.session.own(name)
        self._stale(name)
        if self._turn is not None and name not in self._writing:
            self._writing.add(name)
            self._turn.enter_context(doc.transaction())
        tasks: Map[Any] = doc.get(TASKS, type=Map)
        return tasks

    def _assign(
        self, tid: str, asker: str, worker: str, header: dict[str, Any], n: int, now: int
    ) -> None:
        """§7.2 step 2: the worker's entry, the asker's status, the two attaches."""
        key = self._adverts[worker][0].get("encKey") if worker in self._adverts else None
        self._inbox(worker)[tid] = assignment(header, n, self.epoch, now, key)
        self._inbox(asker)[tid] = assigned_status(worker, n, self.epoch, now)
        self._attach(tid, asker, worker, n)
        self.assigned += 1
        log.info("broker: task %s -> %s (attempt %d)", tid, worker[:8], n)

    def _attach(self, tid: str, asker: str, worker: str, n: int) -> None:
        """Attach the worker to the prompt and the asker to the run: sent by
        ``_send_attaches`` (at the end of the turn, after the inboxes' updates), one
        ``CONTROL`` per agent."""
        self._attaches.setdefault(worker, []).append(prompt_doc(asker, tid))
        self._attaches.setdefault(asker, []).append(run_doc(worker, tid, n))

    def _take_back(self, tid: str, asker: str, worker: str, n: int) -> None:
        tasks = self._inbox(worker)
        if tid in tasks:
            del tasks[tid]
        self._inbox(asker)[tid] = waiting(n, self.epoch)

    def _end(
        self,
        tid: str,
        asker: str,
        worker: Any,
        n: int,
        state: StatusState,
        code: ErrorCode,
        error: str,
    ) -> None:
        if isinstance(worker, str):
            tasks = self._inbox(worker)
            entry = tasks.get(tid)
            if isinstance(entry, dict):
                tasks[tid] = {**entry, "abort": True}
        self._inbox(asker)[tid] = ended(state, self.epoch, now_ms(), code, error, n)

    def _reattach(self) -> None:
        """On gaining the lease: attach again the documents of every task assigned."""
        for name in [n for n in self.session.docs if n.startswith("in/")]:
            for tid, status in self._map(name, TASKS).items():
                if (
                    isinstance(status, dict)
                    and status.get(Status.STATE) == StatusState.ASSIGNED.value
                ):
                    worker = status.get(Status.WORKER)
                    n = int(number(status.get(Status.ATTEMPT)) or 0)
                    if isinstance(worker, str) and n > 0:
                        self._attach(tid, name[3:], worker, n)
        self._send_attaches()

    def _cleanup(
        self, headers: dict[str, dict[str, Any]], statuses: dict[str, tuple[str, Any]]
    ) -> None:
        """Entries of tasks whose header left (the asker read the end, §7.2 step 10), to
        delete (``_sweep``), and workers' entries of tasks now elsewhere."""
        now = time.monotonic()
        for tid, (asker, status) in statuses.items():
            if tid in headers or tid in self._leaving or f"a/{asker}" not in self.session.docs:
                continue
            holders = {inbox(asker)}
            worker = status.get(Status.WORKER)
            if isinstance(worker, str):
                holders.add(inbox(worker))
            self._leaving[tid] = (now, holders)
            self._verified.pop(tid, None)
            self._keys.pop(tid, None)
            self._handed_back.pop(tid, None)
        for name in [n for n in self.session.docs if n.startswith("in/")]:
            agent = name[3:]
            for tid, entry in self._map(name, TASKS).items():
                if not isinstance(entry, dict) or Status.STATE in entry or tid in self._leaving:
                    continue  # a status, not an assignment; or one ``_sweep`` deletes
                owner = statuses.get(tid)
                if owner is None or owner[1].get(Status.WORKER) != agent:
                    del self._inbox(agent)[tid]

    def _sweep(self) -> None:
        """Delete the entries of the tasks that left from the inboxes this turn writes
        anyway, and from any inbox after ``LINGER`` s: one update fewer per task."""
        if not self._leaving:
            return
        now = time.monotonic()
        for tid, (since, holders) in list(self._leaving.items()):
            late = now - since > LINGER
            for name in [h for h in holders if late or h in self._writing]:
                holders.discard(name)
                tasks = self._inbox(name[3:])
                if tid in tasks:
                    del tasks[tid]
            if not holders:
                del self._leaving[tid]


def _unservable(header: dict[str, Any], workers: list[Peer]) -> Unservable | None:
    """Why no worker present can take ``header``'s task; a task only for its candidates
    (``candidatesOnly``) is judged by the candidates present, and waits while none is."""
    if header.get(Header.CANDIDATES_ONLY) is True:
        named = header.get(Header.CANDIDATES)
        workers = [w for w in workers if isinstance(named, list) and w.id in named]
        if not workers:
            return None
    model, needs = _kind(header)[:2]
    return unservable_kind(model, needs, workers)


def _kind(header: dict[str, Any]) -> Kind:
    """What a worker must fit to take the task (``igora.broker.matching``)."""
    model = header.get(Header.MODEL)
    return (None if model == ANY_MODEL else model, _needs(header), TEXT_STYLE)


def _needs(header: dict[str, Any]) -> frozenset[str]:
    raw = header.get(Header.NEEDS)
    return frozenset(x for x in raw if isinstance(x, str)) if isinstance(raw, list) else frozenset()
