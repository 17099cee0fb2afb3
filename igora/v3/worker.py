"""The worker's role in a v3 room (docs/protocol-v3.md §6, §7.2 steps 4-8, §7.3).

It sends its signed advert (``CONTROL advert``: the market writes ``dir.workers``), reads
its inbox ``in/<own id>`` and runs what the lease holder assigned there: in the prompt
document ``p/<asker>/<tid>`` the broker attached to it, it opens its grant
(``crypto.open_grant``: the task key, once the header's signature checks), then the
prompt (``crypto.open_prompt``); it runs the engine (``igora.worker.running``, as a v2
worker does) and writes the run document ``r/<own id>/<tid>.<n>`` (its ``run`` state and
salt in clear, the answer as encrypted ``chunks``, the text and the results in the final
chunk: ``crypto.AnswerWriter``) and ``w/<own id>.runs``. A grant or prompt that does not
open fails the run with the reason. It stops a run when the asker's ``p/…abort`` or the
assignment's ``abort`` is set, or when the assignment leaves its inbox (taken away); it
hands a task back (run state ``handback``, advert ``busy``) when its engine is down. Once
the assignment is removed after the run's end (the asker read it), it drops the run
document and forgets the prompt.

Credits (credits.md §3): when a run is done the worker claims its payment, ``CONTROL
{"op": "claim"}`` with the asker's receipt once it appears in ``p/….receipts[n]`` (its
token counts, price and signature: the worker completes it with what it knows); its
claim with its usage and the hash of its chunks (settled by the market after
``--receipt-wait`` from what it delivered) goes only if no receipt pays the run
(``_hold_unsigned``). A claim the market has not answered is sent again after a
reconnection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from nacl.public import PublicKey
from pycrdt import Array, Doc, Map

from ..credits.receipts import completed, run_hash, worker_knows
from ..engines.base import Engine, EngineError, EngineUnavailable, Finish
from ..identity import Identity, IdentityError, unb64url
from ..lifecycle import usage
from ..protocol import ErrorCode, ProtocolError, TaskField, TaskKind, now_ms, number, validate_task
from ..worker.fit import cannot_serve
from ..worker.running import Pieces, Running, Stop, embed_inputs, request_for, stream_chat
from ..worker.worker import DEFAULT_MAX_TOKENS, HEALTH_INTERVAL
from . import advert as adverts
from .crypto import (
    AnswerWriter,
    CryptoError,
    GrantError,
    new_salt,
    open_grant,
    open_prompt,
    worker_answer_key,
)
from .documents import TASK_ID
from .header import HeaderError, check_fields
from .session import Event, EventKind, Session
from .signed import SignatureError, plain
from .tasks import (
    ABORT,
    ANY_MODEL,
    CHUNKS,
    CIPHERTEXT,
    GRANTS,
    PROMPT,
    RECEIPTS,
    RUN,
    RUNS,
    TASKS,
    Assignment,
    Header,
    RunField,
    RunState,
    inbox,
    prompt_doc,
    run_doc,
    run_key,
    worker_doc,
)
from .wire import Code, notice_answer

log = logging.getLogger("igora.worker")

CREDIT_CODES = (
    Code.CREDITS,
    Code.CREDITS_PENDING,
    Code.CREDITS_REFUSED,
    Code.CREDITS_UNAVAILABLE,
)
GRANT_WAIT = 5.0  # s after its assignment a grant that does not open may still be replaced
RUN_ANNOUNCE = 0.5  # s after its start a run still going gets its w/ entry (``_announce``)
CLAIM_RETRY = 5.0
"""Seconds before a claim the market could not settle yet (``NOTICE 503``: replicas
with no ledger holder for now, credits.md §7) is sent again."""
RECEIPT_GRACE = 2.0
"""Seconds a run done waits for its asker's receipt before its claim without receipt is
sent (``_hold_unsigned``)."""


class RunPieces(Pieces):
    """The answer's pieces, each appended to the run document's ``chunks`` as a chunk
    sealed by ``job.writer``; the first with the run's start (``Job.start``). Pieces that
    come with the engine's end go in the final chunk (``_end``)."""

    HOLD_LAST = True

    def __init__(self, doc: Doc[Any], job: Job) -> None:
        super().__init__()
        self.doc = doc
        self.job = job
        self.chunks: list[bytes] = []  # as written: their hash is the receipt's ``run``

    def _write(self, piece: str, now: float) -> None:
        assert self.job.writer is not None
        chunk = self.job.writer.piece(piece)
        self.chunks.append(chunk)
        with self.doc.transaction():
            self.job.write_start(self.doc)
            self.doc.get(CHUNKS, type=Array).append(chunk)


@dataclass
class Job:
    run: Running
    asker: str
    task: dict[str, Any] | None = None
    ended: bool = False
    key: bytes = b""  # the task key, from the grant
    asker_key: PublicKey | None = None  # the header's ``key``
    writer: AnswerWriter | None = None
    header: dict[str, Any] | None = None
    header_hash: str | None = None  # as the grant's check computed it, for the receipt
    run_hash: str | None = None  # a run done: the hash of its chunks, for its claim
    receipted: bool = False  # its receipt was claimed
    usage: dict[str, Any] | None = None
    start: dict[str, Any] | None = None  # the run's start, until written (with a chunk)
    begun: int = 0  # ms: when the run started
    # the prompt document's Doc as last read, and its ``prompt`` map (``_abort_asked``
    # reads it at every scan: looked up again only when the session holds another Doc)
    prompt_doc: Doc[Any] | None = None
    prompt: Map[Any] | None = None

    def write_start(self, doc: Doc[Any]) -> None:
        """Write the run's start (state, start, salt) in ``doc``, if not yet: as
        protocol-v3.md §7.2 step 4 has it, in one update with the first chunk (or the
        end), not one update of its own."""
        if self.start is not None:
            doc.get(CHUNKS, type=Array)
            doc.get(RUN, type=Map).update(self.start)
            self.start = None


class V3Worker:
    """Runs the tasks assigned to ``identity`` in the room of ``session``."""

    def __init__(
        self,
        session: Session,
        identity: Identity,
        engine: Engine,
        *,
        name: str = "worker",
        slots: int = 1,
        max_tokens: int = DEFAULT_MAX_TOKENS,
    ) -> None:
        if slots < 1:
            raise ValueError(f"a worker runs at least 1 task at once, not {slots}")
        self.session = session
        self.identity = identity
        self.engine = engine
        self.name = name
        self.slots = slots
        self.max_tokens = max_tokens
        self.id = identity.id
        self.available = True
        self.completed = 0
        self.jobs: dict[str, Job] = {}  # tid -> the attempt this worker runs or ran
        self._session_key = identity.session_key()
        self._wake = asyncio.Event()
        self._malformed: set[str] = set()  # inbox entries that are no assignment
        self.claims: dict[tuple[str, int, bool], dict[str, Any]] = {}  # not answered yet
        # (tid, attempt) -> the claim without receipt of a run done, held back while its
        # receipt may come (``_hold_unsigned``)
        self._unsigned: dict[tuple[str, int], dict[str, Any]] = {}
        self.settled = 0  # claims the market settled (with a receipt or from its record)
        # tid -> attempt given to this identity's previous process (another session
        # key): not run here, the broker gives the task a new attempt
        self._inherited: dict[str, int] = {}
        self._key = str(self._session_key.fields()["encKey"])
        # the inbox as read (``_assignments``): its map, kept with its observer (pycrdt
        # drops the observer of a map nobody references), and the entries changed since
        self._read_inbox: Doc[Any] | None = None
        self._inbox_tasks: Map[Any] | None = None
        self._inbox_watch: Any = None  # the subscription of the observer
        self._entries: dict[str, Any] = {}
        self._changed: set[str] = set()
        session.own(worker_doc(self.id))
        session.subscribe(inbox(self.id))
        session.observe(self._on_event)

    # Read from the session each time: a new epoch of either (protocol-v3.md §9) is a
    # new Doc.
    @property
    def _runs(self) -> Doc[Any]:
        return self.session.docs[worker_doc(self.id)]

    @property
    def _inbox(self) -> Doc[Any] | None:
        return self.session.docs.get(inbox(self.id))

    # ------------------------------------------------------------------ advert
    def advert(self) -> dict[str, Any]:
        return adverts.make(
            self.identity,
            self._session_key,
            name=self.name[: adverts.MAX_LABEL],
            engine=self.engine.kind,
            models=[m.advert() for m in self.engine.models()],
            slots=self.slots,
            state="ready" if self.available else "busy",
        )

    def publish(self) -> None:
        self.session.control({"op": "advert", **self.advert()})

    # ------------------------------------------------------------------ main loop
    async def run(self) -> None:
        self.available = await self.engine.available()
        self.publish()
        health = asyncio.create_task(self._health_loop())
        try:
            while True:
                self._wake.clear()
                try:
                    self._scan()
                except Exception:  # a bug on one entry must not stop the worker
                    log.exception("%s: reading the inbox failed", self.name)
                tick = asyncio.get_running_loop().call_later(1.0, self._wake.set)
                await self._wake.wait()
                tick.cancel()
        finally:
            health.cancel()
            for key in list(self._unsigned):  # what waits for a receipt is claimed now
                self._send_unsigned(key)
            for job in self.jobs.values():
                if job.run.job:
                    job.run.job.cancel()

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_INTERVAL)
            ok = await self.engine.available()
            if ok != self.available:
                self.available = ok
                log.warning("%s: engine %s", self.name, "is back" if ok else "is unavailable; busy")
                self.publish()

    def _on_event(self, event: Any) -> None:
        if event.kind is EventKind.CONNECTED:
            self.publish()  # a CONTROL is not kept across connections
            for body in self.claims.values():
                self.session.control(body)
        elif event.kind is EventKind.NOTICE and event.code in CREDIT_CODES:
            self._claimed(event)
            return  # a claim's answer changes no run nor assignment: nothing to scan
        elif event.kind is EventKind.CHANGED and event.name.startswith("p/"):
            self._receipt(event.name)
        self._wake.set()

    # ------------------------------------------------------------------ credits
    def _claim_body(self, job: Job, receipt: dict[str, Any] | None) -> dict[str, Any]:
        """The claim of a run done: with the asker's receipt, or with the usage and run
        hash (the market then settles from its delivery record)."""
        assert job.header is not None and job.run_hash is not None
        body: dict[str, Any] = {"op": "claim", "header": job.header, "attempt": job.run.attempt}
        if receipt is not None:
            body["receipt"] = receipt
        else:
            body["usage"] = job.usage
            body["run"] = job.run_hash
        return body

    def _send_claim(self, key: tuple[str, int, bool], body: dict[str, Any]) -> None:
        """Send a claim, kept until the market answers it (sent again on reconnection)."""
        self.claims[key] = body
        self.session.control(body)

    def _resend_claim(self, key: tuple[str, int, bool]) -> None:
        body = self.claims.get(key)
        if body is not None:
            self.session.control(body)

    def _hold_unsigned(self, tid: str, job: Job) -> None:
        """The claim without receipt of a run done, sent only if no receipt settles the
        run first: once the market refused the receipt, before the run document is
        dropped if no receipt came (the market keeps its delivery record for a claim), or
        ``RECEIPT_GRACE`` s after the run's end unless the receipt's claim was answered
        (a market without credits answers none). Sent at once, it cost the market a
        claim to parse, a header to verify and an answer per task, though nearly every
        run is paid by its receipt within milliseconds."""
        key = (tid, job.run.attempt)
        self._unsigned[key] = self._claim_body(job, None)
        asyncio.get_running_loop().call_later(RECEIPT_GRACE, self._send_unsigned, key)

    def _send_unsigned(self, key: tuple[str, int]) -> None:
        body = self._unsigned.pop(key, None)
        if body is not None:
            self._send_claim((*key, False), body)

    def _receipt(self, name: str) -> None:
        """A prompt document changed: claim with its receipt if the run's is there (the
        asker writes only what this worker does not know: ``receipts.completed``)."""
        tid = name.rpartition("/")[2]
        job = self.jobs.get(tid)
        if job is None or job.run_hash is None or job.receipted:
            return
        doc = self.session.docs.get(name)
        written = doc.get(RECEIPTS, type=Map).get(str(job.run.attempt)) if doc else None
        if isinstance(written, dict):
            job.receipted = True
            with contextlib.suppress(SignatureError):  # Yjs gives floats: as signed
                written = plain(written)
            assert job.header is not None
            knows = worker_knows(
                self.session.market or "",
                job.header,
                job.run.attempt,
                self.id,
                job.run_hash,
                job.header_hash,
            )
            receipt = completed(written, knows)
            self._send_claim((tid, job.run.attempt, True), self._claim_body(job, receipt))

    def _claimed(self, event: Event) -> None:
        """The market's answer to a claim (a NOTICE whose text is JSON)."""
        body = notice_answer(event.text, "claim")
        if body is None:
            return
        tid, attempt, result = body.get("task"), body.get("attempt"), body.get("result")
        run = (str(tid), int(number(attempt) or 0))
        if result == "pending":  # the market holds it: settled from its record, or a receipt
            self.claims.pop((*run, False), None)
            return
        ours = [k for k in self.claims if k[:2] == run]
        if result == "unavailable":  # kept, and sent again (a second time is a duplicate)
            for key in ours:
                asyncio.get_running_loop().call_later(CLAIM_RETRY, self._resend_claim, key)
            return
        answered = sorted(ours, key=lambda k: not k[2])[:1]  # the receipt's first
        for key in answered:
            del self.claims[key]
        if result in ("settled", "duplicate"):  # paid: the claim without receipt is moot
            self._unsigned.pop(run, None)
        elif result == "refused" and answered and answered[0][2]:
            self._send_unsigned(run)  # the receipt was refused: the record may pay
        if result == "settled":
            self.settled += 1
            log.info("%s: task %s paid %s millicredits", self.name, tid, body.get("price"))
        elif result == "refused":
            log.warning("%s: claim of task %s refused: %s", self.name, tid, body.get("error"))

    # ------------------------------------------------------------------ inbox
    def _assignments(self) -> dict[str, Any]:
        """The inbox's entries (never to be changed: it is kept). Only the entries changed
        since the last look are read again: a scan comes with every event (a prompt, a
        receipt, a claim's answer), and converting every assignment (a header each) at
        each one was most of a scan."""
        doc = self._inbox
        if doc is None:
            return {}
        if doc is not self._read_inbox:  # the first look, or a new epoch: a new Doc
            self._read_inbox = doc
            tasks = self._inbox_tasks = doc.get(TASKS, type=Map)
            self._inbox_watch = tasks.observe(lambda event: self._changed.update(event.keys))
            self._changed.clear()
            self._entries = dict(tasks.items())
        tasks = self._inbox_tasks
        assert tasks is not None
        changed, self._changed = self._changed, set()
        for tid in changed:
            if tid in tasks:
                self._entries[tid] = tasks[tid]
            else:
                self._entries.pop(tid, None)
        return self._entries

    def _scan(self) -> None:
        assigned = self._assignments()
        for tid, job in list(self.jobs.items()):
            entry = assigned.get(tid)
            same = (
                isinstance(entry, dict) and number(entry.get(Assignment.ATTEMPT)) == job.run.attempt
            )
            if not same:
                if job.ended:  # read, or given again (a new attempt): the prompt stays then
                    self._cleanup(tid, job, keep_prompt=isinstance(entry, dict))
                elif not job.run.stop_reason:
                    job.run.halt(Stop.LOST)
            elif not job.ended and not job.run.stop_reason and self._abort_asked(tid, job, entry):
                job.run.halt(Stop.ABORTED)
        self._malformed &= assigned.keys()  # logged once while it stays
        self._inherited = {t: n for t, n in self._inherited.items() if t in assigned}
        for tid, entry in list(assigned.items()):
            if (
                tid not in self.jobs
                and tid not in self._malformed
                and sum(not j.ended for j in self.jobs.values()) < self.slots
            ):
                self._take(tid, entry)

    def _abort_asked(self, tid: str, job: Job, entry: Any) -> bool:
        if isinstance(entry, dict) and entry.get(Assignment.ABORT):
            return True
        doc = self.session.docs.get(prompt_doc(job.asker, tid))
        if doc is None:
            return False
        if doc is not job.prompt_doc or job.prompt is None:
            job.prompt_doc, job.prompt = doc, doc.get(PROMPT, type=Map)
        return bool(job.prompt.get(ABORT))

    def _take(self, tid: str, entry: Any) -> None:
        """Start an assignment, once its prompt is here; refuse a bad one."""
        if not isinstance(entry, dict) or not TASK_ID.fullmatch(tid):
            log.warning("%s: ignored a malformed assignment %r", self.name, tid[:16])
            self._malformed.add(tid)
            return
        header = entry.get(Assignment.HEADER)
        with contextlib.suppress(SignatureError):  # Yjs gives floats: as signed, first
            header = plain(header)
        attempt = number(entry.get(Assignment.ATTEMPT))
        if not isinstance(header, dict) or attempt is None or attempt < 1:
            log.warning("%s: ignored a malformed assignment %r", self.name, tid[:16])
            self._malformed.add(tid)
            return
        n = int(attempt)
        key = entry.get(Assignment.KEY)
        if self._inherited.get(tid) == n:
            return
        if isinstance(key, str) and key != self._key:
            # Assigned to this identity's previous process: its run document (same
            # name) holds that process's salt and chunks, which no reader could mix
            # with ours. Not run: the broker sees the new key and gives a new attempt.
            log.info("%s: task %s (attempt %d) was our previous process's", self.name, tid, n)
            self._inherited[tid] = n
            return
        try:  # the signature is checked with the grant (``open_grant``)
            check_fields(header)
            if header.get(Header.ID) != tid:
                raise HeaderError(f"the header is of task {header.get(Header.ID)!r}, not {tid}")
        except HeaderError as exc:
            log.warning("%s: assignment %s refused: %s", self.name, tid, exc)
            job = self.jobs[tid] = Job(Running(tid, n), "")
            self._end(tid, job, RunState.FAILED, error=str(exc), code=ErrorCode.INVALID_TASK)
            return
        asker = str(header[Header.ASKER])
        prompt = self.session.docs.get(prompt_doc(asker, tid))
        fields = None if prompt is None else prompt.get(PROMPT, type=Map)
        ct = None if fields is None else fields.get(CIPHERTEXT)
        grants = None if fields is None else fields.get(GRANTS)
        grant = grants.get(self.id) if isinstance(grants, (Map, dict)) else None
        if ct is None or grant is None:
            # the prompt document comes right behind the assignment (attached); a grant
            # made late (protocol-v3.md §7.2) comes after it
            log.debug("%s: task %s waits for its prompt and grant", self.name, tid)
            return
        try:
            key, hashed = open_grant(self._session_key, _bytes(grant), header)
        except GrantError as exc:
            # A grant sealed to this worker's previous session key (it restarted): the
            # asker seals a new one when it sees the new advert. Wait for it a while.
            start = number(entry.get(Assignment.START)) or 0
            if now_ms() - start < GRANT_WAIT * 1000:
                log.debug("%s: task %s: %s; waiting for a new grant", self.name, tid, exc)
                return
            key, hashed = b"", None
            error: CryptoError | None = exc
        else:
            error = None
        job = self.jobs[tid] = Job(Running(tid, n), asker, header=header, header_hash=hashed)
        try:
            if error is not None:
                raise error
            job.key = key
            job.asker_key = PublicKey(unb64url(str(header.get(Header.KEY)), 32, "header key"))
            pt = open_prompt(job.key, tid, asker, _bytes(ct))
        except (CryptoError, IdentityError) as exc:
            log.warning("%s: task %s: %s", self.name, tid, exc)
            self._end(tid, job, RunState.FAILED, error=str(exc), code=ErrorCode.INVALID_TASK)
            return
        try:
            task = self._task(tid, header, pt)
        except ProtocolError as exc:
            self._end(tid, job, RunState.FAILED, error=str(exc), code=ErrorCode.INVALID_TASK)
            return
        job.task = task
        why = cannot_serve(self.engine, task, self.name)
        if why is not None:
            self._end(tid, job, RunState.FAILED, error=why[1], code=why[0])
            return
        if not self.available:
            self._end(tid, job, RunState.HANDBACK, error="engine unavailable")
            return
        if self._abort_asked(tid, job, entry):
            self._end(tid, job, RunState.ABORTED, error="aborted before it started")
            return
        self._start(tid, job)

    def _task(self, tid: str, header: dict[str, Any], pt: Any) -> dict[str, Any]:
        """The v2 task the engine runs: the prompt's private fields, with the header's
        id, asker, model, limits and dates."""
        if not isinstance(pt, dict):
            raise ProtocolError("the prompt document holds no request")
        task = dict(pt)
        task[TaskField.ID] = tid
        task[TaskField.ASKER] = header[Header.ASKER]
        for field in (Header.MODEL, Header.MAX_TOKENS, Header.DATE, Header.DEADLINE):
            if header.get(field) not in (None, ANY_MODEL):
                task[field] = header[field]
        return validate_task(task)

    # ------------------------------------------------------------------ running
    def _start(self, tid: str, job: Job) -> None:
        n, now = job.run.attempt, now_ms()
        salt = new_salt()
        assert job.asker_key is not None
        answer_key = worker_answer_key(job.key, self._session_key, job.asker_key, n, salt)
        job.writer = AnswerWriter(answer_key, tid, n)
        # a run document is new: one per attempt (after a restart of this worker, what
        # the market holds of it is as unreadable with the new salt either way)
        doc = self.session.own(run_doc(self.id, tid, n), new=True)
        job.start = {RunField.STATE: RunState.DOING.value, RunField.START: now, RunField.SALT: salt}
        job.begun = now
        asyncio.get_running_loop().call_later(RUN_ANNOUNCE, self._announce, tid, job)
        log.info("%s: task %s started (attempt %d)", self.name, tid, n)
        job.run.job = asyncio.create_task(self._execute(tid, job, doc))

    def _announce(self, tid: str, job: Job) -> None:
        """``w/<own id>.runs`` gets the entry of a run still going ``RUN_ANNOUNCE`` s
        after its start (what the broker's claim timeout looks for); a run ended sooner
        has one entry, written at its end with its start: one update fewer per task."""
        if not job.ended and self.jobs.get(tid) is job:
            self._runs.get(RUNS, type=Map)[run_key(tid, job.run.attempt)] = {
                RunField.STATE: RunState.DOING.value,
                RunField.START: job.begun,
            }

    async def _execute(self, tid: str, job: Job, doc: Doc[Any]) -> None:
        assert job.task is not None and job.writer is not None
        task, run = job.task, job.run
        answer = RunPieces(doc, job)
        started = time.monotonic()
        results: dict[str, Any] = {}
        state, code, error = RunState.DONE, None, ""
        try:
            request = request_for(self.engine, task, self.max_tokens)
            if task.get(TaskField.KIND) == TaskKind.EMBED.value:
                vectors = await embed_inputs(self.engine, run, task, request.model)
                if vectors is not None:
                    results[RunField.EMBEDDINGS] = vectors.vectors
                    results[RunField.USAGE] = usage(vectors.prompt_tokens, 0)
            else:
                finish = await stream_chat(
                    self.engine, run, task, request, answer, self.session.heartbeat
                )
                if finish is not None:
                    results.update(_results(finish))
        except EngineUnavailable as exc:
            state, error = RunState.HANDBACK, str(exc)
            self.available = False
            self.publish()
        except EngineError as exc:
            state, code, error = RunState.FAILED, ErrorCode.ENGINE_ERROR, str(exc)
        except Exception as exc:  # an engine bug must not kill the worker
            log.exception("%s: task %s: engine error", self.name, tid)
            state, code = RunState.FAILED, ErrorCode.ENGINE_ERROR
            error = f"engine error: {type(exc).__name__}: {exc}"
        if state is RunState.DONE and run.stop_reason is not None:
            if run.stop_reason is Stop.DEADLINE:
                state, code = RunState.FAILED, ErrorCode.DEADLINE
                error = "the task passed its deadline while running"
            else:
                state, code, error = RunState.ABORTED, ErrorCode.ABORTED, "aborted"
        if run.stop_reason is Stop.LOST:
            log.info("%s: task %s was taken away; stopped", self.name, tid)
        elapsed = time.monotonic() - started
        if state is not RunState.DONE and answer.held:
            answer.flush()
        held, answer.held = answer.held, ""  # the rest of the text goes in the final chunk
        self._end(
            tid, job, state, error=error, code=code, results=results, held=held, pieces=answer
        )
        if state is RunState.DONE:
            self.completed += 1
        log.info("%s: task %s %s (%.2f s)", self.name, tid, state.value, elapsed)
        self._wake.set()

    def _end(
        self,
        tid: str,
        job: Job,
        state: RunState,
        *,
        error: str = "",
        code: ErrorCode | None = None,
        results: dict[str, Any] | None = None,
        held: str = "",
        pieces: RunPieces | None = None,
    ) -> None:
        """Write the run's end in its document and in ``w/<own id>.runs``, one turn: a
        run done gets its final chunk (``held``, the text not written yet, and the
        ``results``); only its state, finish reason, usage and end are in clear."""
        job.ended = True
        n, now = job.run.attempt, now_ms()
        results = {k: v for k, v in (results or {}).items() if v is not None}
        end: dict[str, Any] = {RunField.STATE: state.value, RunField.END: now}
        for clear in (RunField.FINISH_REASON, RunField.USAGE):
            if clear in results:
                end[clear] = results.pop(clear)
        if error:
            end[RunField.ERROR] = error
        if code is not None:
            end[RunField.ERROR_CODE] = code.value
        doc = self.session.own(run_doc(self.id, tid, n))
        final = None
        with doc.transaction():
            job.write_start(doc)
            if state is RunState.DONE and job.writer is not None:
                final = job.writer.final(
                    held,
                    str(end.get(RunField.FINISH_REASON) or "stop"),
                    dict(end.get(RunField.USAGE) or {}),
                    **results,
                )
                doc.get(CHUNKS, type=Array).append(final)
            doc.get(RUN, type=Map).update(end)
        with self._runs.transaction():
            runs = self._runs.get(RUNS, type=Map)
            summary = {
                k: end[k]
                for k in (
                    RunField.STATE,
                    RunField.END,
                    RunField.ERROR,
                    RunField.ERROR_CODE,
                    RunField.USAGE,
                )
                if k in end
            }
            runs[run_key(tid, n)] = {**summary, RunField.START: job.begun or now}
        if state is RunState.HANDBACK:
            log.warning("%s: task %s handed back: %s", self.name, tid, error)
        if final is not None and job.header is not None:
            job.run_hash = run_hash([*(pieces.chunks if pieces is not None else []), final])
            job.usage = dict(end.get(RunField.USAGE) or {})
            self._hold_unsigned(tid, job)
            self._receipt(prompt_doc(job.asker, tid))  # already there, if the asker was quick

    def _cleanup(self, tid: str, job: Job, keep_prompt: bool = False) -> None:
        """The assignment of an ended run is gone: the run document and the prompt go
        (the prompt stays with ``keep_prompt``: the task came back for a new attempt, and
        unsubscribing would end its attachment)."""
        del self.jobs[tid]
        if job.run.attempt < 1:
            return
        if not job.receipted:  # the market keeps its delivery record for a claim only
            self._send_unsigned((tid, job.run.attempt))
        name = run_doc(self.id, tid, job.run.attempt)
        if name in self.session.docs:
            self.session.drop(name)
        if job.asker and not keep_prompt:
            prompt = prompt_doc(job.asker, tid)
            if prompt in self.session.docs:
                self.session.unsubscribe(prompt)
        runs = self._runs.get(RUNS, type=Map)
        key = run_key(tid, job.run.attempt)
        if key in runs:
            del runs[key]


def _bytes(value: Any) -> bytes:
    """A byte value as read from Yjs (``bytearray``); anything else gives b"", which no
    cryptographic check passes."""
    return bytes(value) if isinstance(value, (bytes, bytearray)) else b""


def _results(finish: Finish) -> dict[str, Any]:
    return {
        RunField.FINISH_REASON: finish.reason,
        RunField.USAGE: usage(finish.prompt_tokens, finish.completion_tokens),
        RunField.TOOL_CALLS: finish.tool_calls or None,
        RunField.LOGPROBS: finish.logprobs or None,
        RunField.CHOICES: finish.choices or None,
    }
