"""``igora worker``: runs the tasks the broker assigns to it, streaming tokens back.

A task in ``prepared`` whose ``worker`` is this worker's id is moved to ``doing`` when a
slot is free. Tokens are appended to a ``Y.Text`` in ``streams`` (linear bytes on the
wire). While agents of the original protocol are in the room, the original fields of
``doing[id]`` (``response``, ``delta``, ``chunkDate``) are also refreshed, at most every
``compat_interval`` seconds and only when the answer grew by a quarter since the last
refresh, so original readers follow along at a cost that stays linear in the answer's
length; with only Igora agents in the room the stream alone carries the answer. The task ends in ``done`` as ``done``, ``failed`` (with
``error``) or ``aborted``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from pycrdt import Map, Text

from ..agent import Agent, discard
from ..capabilities import fits, model_for, required
from ..engines.base import (
    Embeddings,
    Engine,
    EngineError,
    EngineUnavailable,
    Finish,
    Request,
)
from ..protocol import (
    ABORTED_MARK,
    FINAL_VALUES,
    LIVE,
    A,
    AgentState,
    ErrorCode,
    F,
    MapName,
    ProtocolError,
    State,
    TaskKind,
    abort_asked,
    is_original,
    now_ms,
    stream_key,
    task_of,
    validate_task,
)

COMPAT_INTERVAL = 0.25
COMPAT_GROWTH = 1.25
STREAM_INTERVAL = 0.025  # seconds: pieces arriving faster are written together (the first at once)
DEFAULT_MAX_TOKENS = 512  # for tasks that set no maxTokens: small models loop forever
HEALTH_INTERVAL = 5.0
STRAY_CHECK = 2.0  # seconds between two looks for tasks wrongly attributed to this worker
STALL_SETTLE = 0.2  # seconds to read the market's news after this process stood still
_RUN_FIELDS = (F.WORKER, F.RESPONSE, F.DELTA, F.CHUNK_DATE, F.STREAM)
WORKING_WITHIN = 0.1  # seconds: "working" (all slots taken) is advertised within this
ADVERT_INTERVAL = 0.5  # seconds: a change of the running count alone is advertised within this
HANDBACK_ATTEMPTS = 3  # a task is handed back to ``todos`` only while it has had fewer assignments
REMEMBER_ENDED = 10_000  # ids of the last tasks this worker ended, to know their ghosts
DELETED = "deleted"  # stop reason: the doing entry vanished, moved nowhere (see _after_transaction)

log = logging.getLogger("igora.worker")


class _Done(Exception):
    """An embed task ended (answered, or stopped): no token stream to read."""


@dataclass
class Running:
    task_id: str
    attempt: int
    job: asyncio.Task[None] | None = None
    # "aborted", "lost" (taken away), DELETED (its entry deleted) or a deadline message
    stop_reason: str | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)


class Worker:
    def __init__(
        self,
        agent: Agent,
        engine: Engine,
        *,
        slots: int = 1,
        compat_interval: float = COMPAT_INTERVAL,
        max_tokens: int = DEFAULT_MAX_TOKENS,
    ) -> None:
        self.agent = agent
        self.engine = engine
        if slots < 1:
            raise ValueError(f"a worker runs at least 1 task at once, not {slots}")
        self.slots = slots
        self.compat_interval = compat_interval
        self.max_tokens = max_tokens
        self._readers_checked = -1.0
        self._readers = True
        self.running: dict[str, Running] = {}
        self.available = True
        self.speed: float | None = None
        self.completed = 0
        self._strays_checked = 0.0
        self._wake = asyncio.Event()
        self._advertised: dict[str, Any] = {}
        self._advert_due: asyncio.TimerHandle | None = None
        self._dirty_since: float | None = None  # loop time of the first change not said yet
        # Only a task written to ``prepared`` for this worker can bring one to claim (a
        # freed slot wakes the loop itself, to look at all of ``prepared``): waking on every
        # update of the room would rescan ``prepared`` at every token any worker streams.
        self._claimable: set[str] = set()
        self._scan_all = True
        self._scanned_at = 0.0
        # Tasks this worker ended lately: an entry a race brings back under one of those
        # ids is a ghost, to drop (not to hand back, nor to end again).
        self._ended: dict[str, None] = {}
        # Within the transaction being applied: running tasks whose doing entry was
        # deleted, and those moved (written to todos, prepared or done, or their stream
        # deleted: a broker taking a task away drops its stream in the same transaction).
        self._deleted: dict[str, Running] = {}
        self._moved: set[str] = set()
        agent.observe_keys(MapName.PREPARED, self._on_prepared)
        agent.observe_keys(MapName.DOING, self._on_doing)
        agent.observe_keys(MapName.TODOS, self._on_elsewhere)
        agent.observe_keys(MapName.DONE, self._on_elsewhere)
        agent.observe_keys(MapName.STREAMS, self._on_streams)
        agent.on_change(self._after_transaction)

    # The maps, looked up at each use: the agent replaces its document when it compacts
    # it, and a Map of the old one must never be touched again.
    @property
    def prepared(self) -> Map:
        return self.agent.maps[MapName.PREPARED]

    @property
    def doing(self) -> Map:
        return self.agent.maps[MapName.DOING]

    @property
    def done(self) -> Map:
        return self.agent.maps[MapName.DONE]

    @property
    def todos(self) -> Map:
        return self.agent.maps[MapName.TODOS]

    @property
    def streams(self) -> Map:
        return self.agent.maps[MapName.STREAMS]

    # ------------------------------------------------------------------ adverts
    def advert(self) -> dict[str, Any]:
        busy = len(self.running)
        ready = self.available and busy < self.slots
        return {
            A.STATE: AgentState.READY.value if ready else (
                AgentState.WORKING.value if self.available else AgentState.BUSY.value),
            A.ENGINE: self.engine.kind,
            A.MODELS: [m.advert() for m in self.engine.models()],
            A.SLOTS: self.slots if self.available else 0,
            A.RUNNING: busy,
            A.SPEED: round(self.speed, 1) if self.speed else None,
        }

    def _publish(self) -> None:
        self._cancel_advert()
        self._advertised = self.advert()
        self.agent.set_state(**self._advertised)

    def _advert_changed(self) -> None:
        """A task started or ended: say so in the advert, not always at once. Each
        awareness update is relayed to every agent of the room and read by each, and a
        short task would cost two (``working``, then ``ready`` again) on top of its own
        document updates. So ``ready`` again (a slot freed after ``working`` was said) is
        said at once; ``working`` within WORKING_WITHIN, not at all if a slot frees before;
        a change of the running count alone within ADVERT_INTERVAL."""
        advert = self.advert()
        said = self._advertised
        if advert == said:
            self._cancel_advert()
            return
        loop = asyncio.get_running_loop()
        if self._dirty_since is None:
            self._dirty_since = loop.time()
        if advert[A.STATE] != said.get(A.STATE) or advert[A.SLOTS] != said.get(A.SLOTS):
            if advert[A.STATE] == AgentState.READY.value:
                self._publish()
                return
            when = min(loop.time() + WORKING_WITHIN, self._dirty_since + ADVERT_INTERVAL)
        else:
            when = self._dirty_since + ADVERT_INTERVAL
        if self._advert_due is None or self._advert_due.when() != when:
            if self._advert_due is not None:
                self._advert_due.cancel()
            self._advert_due = loop.call_at(when, self._publish)

    def _cancel_advert(self) -> None:
        if self._advert_due is not None:
            self._advert_due.cancel()
            self._advert_due = None
        self._dirty_since = None

    # ------------------------------------------------------------------ main loop
    async def run(self) -> None:
        self.available = await self.engine.available()  # never advertise a dead upstream ready
        self._publish()
        health = asyncio.create_task(self._health_loop())
        try:
            while True:
                self._wake.clear()
                self._claim()
                if time.monotonic() - self._strays_checked > STRAY_CHECK:
                    self._hand_back_strays()
                # A timer rather than wait_for, which costs a task per wake.
                tick = asyncio.get_running_loop().call_later(1.0, self._wake.set)
                await self._wake.wait()
                tick.cancel()
        finally:
            health.cancel()
            for r in list(self.running.values()):
                if r.job:
                    r.job.cancel()

    async def _health_loop(self) -> None:
        while True:
            ok = await self.engine.available()
            if ok != self.available:
                self.available = ok
                log.warning("%s: engine %s", self.agent.name,
                            "is back" if ok else "is unavailable; not taking tasks")
                self._publish()
            await asyncio.sleep(HEALTH_INTERVAL)

    def _on_prepared(self, changes: dict[str, dict[str, Any]]) -> None:
        me = self.agent.id
        for key, change in changes.items():
            value = change.get("newValue")
            if isinstance(value, dict) and value.get(F.WORKER) == me:
                self._claimable.add(key)
                self._wake.set()
        self._on_elsewhere(changes)

    def _on_elsewhere(self, changes: dict[str, dict[str, Any]]) -> None:
        """A running task written to todos, prepared or done: moved on, or an abort mark
        that landed on an entry the task had left (the mark belongs to the task)."""
        for key, change in changes.items():
            run = self.running.get(key)
            if run is None or change.get("action") == "delete":
                continue
            self._moved.add(key)
            if not run.stop_reason and abort_asked(change.get("newValue")):
                self._stop(run, "aborted")

    def _on_streams(self, changes: dict[str, dict[str, Any]]) -> None:
        for key, change in changes.items():
            if change.get("action") == "delete":
                tid = task_of(MapName.STREAMS.value, key)
                if tid in self.running:
                    self._moved.add(tid)

    def _after_transaction(self) -> None:
        """A doing entry deleted in a transaction that wrote its id nowhere else and left
        its stream was not moved (a broker's re-queue or end writes the task elsewhere and
        drops its stream in the same transaction, also when the market relays a backlog
        merged into one update): a buggy or hostile agent deleted it. Nobody else knows
        that the task was running, so this worker ends it."""
        if self._deleted:
            for key, run in self._deleted.items():
                if key not in self._moved and run.stop_reason == "lost":
                    run.stop_reason = DELETED
            self._deleted.clear()
        self._moved.clear()

    def _candidates(self) -> list[tuple[str, Any]]:
        """Tasks of ``prepared`` that may be this worker's: all of them after a slot freed
        (and at least every second), else those written for it since the last look."""
        now = time.monotonic()
        if self._scan_all or now - self._scanned_at >= 1.0:
            self._scan_all, self._scanned_at = False, now
            self._claimable.clear()
            return list(self.prepared.items())
        ids, self._claimable = self._claimable, set()
        return [(tid, self.prepared.get(tid)) for tid in ids]

    def _claim(self) -> None:
        if not self.agent.synced.is_set():
            return
        candidates = self._candidates()
        if candidates:
            # The tasks taken in one look start in one transaction: one update for all.
            with self.agent.transaction():
                self._claim_from(candidates)

    def _claim_from(self, candidates: list[tuple[str, Any]]) -> None:
        me = self.agent.id
        for task_id, value in candidates:
            if len(self.running) >= self.slots:
                return
            if not isinstance(value, dict) or value.get(F.WORKER) != me or task_id in self.running:
                continue
            try:
                task = validate_task(value)
            except ProtocolError as exc:
                log.warning("%s: task %s rejected: %s", self.agent.name, task_id, exc)
                self._finish_from(MapName.PREPARED, task_id, value, State.FAILED,
                                  error=f"invalid task: {exc}")
                continue
            if abort_asked(task, self.todos.get(task_id), self.done.get(task_id)):
                self._finish_from(MapName.PREPARED, task_id, task, State.ABORTED,
                                  error="aborted before it started")
                continue
            why = self._cannot_serve(task)
            if why is not None:
                self._finish_from(MapName.PREPARED, task_id, task, State.FAILED,
                                  error=why[1], code=why[0])
                continue
            if not self.available:
                if self._another_can_serve(task):  # assigned just before we went busy
                    with self.agent.transaction():
                        self.prepared.pop(task_id, None)
                        self.todos[task_id] = {**{k: v for k, v in task.items() if k != F.WORKER},
                                               F.STATE: State.TODO.value}
                continue
            self._start(task_id, task)

    def _cannot_serve(self, task: dict[str, Any]) -> tuple[ErrorCode, str] | None:
        """Why this worker cannot run a task assigned to it (a broker that does not check
        capabilities, or a forged assignment), or None."""
        model = task.get(F.MODEL)
        models = {m.name: m for m in self.engine.models()}
        if model and model not in models:
            if is_original(task) and task.get(F.KIND) is None:
                return None  # an original agent's model name: the worker's own model answers
            return (ErrorCode.MODEL_NOT_SERVED,
                    f"worker {self.agent.name} does not serve model {model!r}")
        needs = required(task)
        have = models[model].capabilities if model else (
            frozenset() if self.engine.model_for(needs) is None else needs)
        if not needs <= have:
            missing = " + ".join(sorted(needs - have))
            on = model or self.engine.default_model()
            return (ErrorCode.CAPABILITY_NOT_SERVED,
                    f"worker {self.agent.name} does not offer {missing} on model {on!r}")
        return None

    def _request(self, task: dict[str, Any]) -> Request:
        """The engine request of a task: on the task's model if this worker serves it, else
        on its first model that offers what the task needs."""
        request = Request.from_task(task)
        if request.max_tokens is None:
            request.max_tokens = self.max_tokens
        if request.model not in {m.name for m in self.engine.models()}:
            request.model = self.engine.model_for(required(task))
        return request

    def _hand_back_strays(self) -> None:
        """Tasks ``doing`` says this worker runs while it does not (a forged entry, or a
        write that lost a race) go back to ``todos`` for the broker to assign again;
        otherwise they would wait for their deadline, since this worker is present."""
        self._strays_checked = time.monotonic()
        if not self.agent.synced.is_set():
            return
        me = self.agent.id
        strays = [(tid, v) for tid, v in list(self.doing.items())
                  if isinstance(v, dict) and v.get(F.WORKER) == me and tid not in self.running]
        if not strays:
            return
        with self.agent.transaction():
            for tid, value in strays:
                final = self.done.get(tid)
                if tid in self._ended or (isinstance(final, dict)
                                          and final.get(F.STATE) in FINAL_VALUES):
                    # A write that raced with the task's end (an abort mark, say) brought
                    # the entry back: the task is over, drop the ghost.
                    self._drop_entries(tid)
                    log.info("%s: dropped ended task %s left in doing", self.agent.name, tid)
                elif abort_asked(value, self.todos.get(tid), self.prepared.get(tid)):
                    log.info("%s: task %s left in doing under this worker was aborted; "
                             "ended", self.agent.name, tid)
                    self._finish_from(MapName.DOING, tid, value, State.ABORTED,
                                      error="aborted before it started")
                else:
                    log.warning("%s: task %s is in doing under this worker, which is not "
                                "running it; handed back to todos", self.agent.name, tid)
                    self.doing.pop(tid, None)
                    self.todos[tid] = {**{k: v for k, v in value.items()
                                          if k not in _RUN_FIELDS}, F.STATE: State.TODO.value}

    def _start(self, task_id: str, task: dict[str, Any]) -> None:
        attempt = int(task.get(F.ATTEMPTS) or 1)
        key = stream_key(task_id, attempt)
        now = now_ms()
        doing = {
            **task,
            F.STATE: State.DOING.value,
            F.WORKER: self.agent.id,
            F.STREAM: key,
            F.RESPONSE: "",
            F.START: task.get(F.START) or now,
        }
        with self.agent.transaction():
            discard(self.prepared, task_id)
            self.doing[task_id] = doing
            self.streams[key] = Text()
        run = Running(task_id, attempt)
        self.running[task_id] = run
        log.info("%s: task %s started (model %s, attempt %d)", self.agent.name, task_id,
                 task.get(F.MODEL) or "default", attempt)
        run.job = asyncio.create_task(self._execute(run, doing))
        self._advert_changed()

    # ------------------------------------------------------------------ watching
    def _on_doing(self, changes: dict[str, dict[str, Any]]) -> None:
        for key, change in changes.items():
            run = self.running.get(key)
            if run is None or run.stop_reason:
                continue
            value = change.get("newValue")
            if change.get("action") == "delete":
                self._deleted[key] = run  # lost, unless moved (see _after_transaction)
                self._stop(run, "lost")
            elif not isinstance(value, dict):
                self._stop(run, "lost")
            elif value.get(F.WORKER) != self.agent.id:
                self._stop(run, "lost")
            elif value.get(F.ABORTED):
                self._stop(run, "aborted")

    def _stop(self, run: Running, reason: str) -> None:
        run.stop_reason = reason
        run.stop.set()

    # ------------------------------------------------------------------ running
    async def _tokens(self, run: Running, request: Request) -> AsyncIterator[list[str] | Finish]:
        """The engine's stream, coalesced: every piece ready at once comes in one batch."""
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def produce() -> None:
            try:
                async for item in self.engine.generate(request):
                    queue.put_nowait(item)
                    if isinstance(item, Finish):
                        return
            except Exception as exc:  # handed to the consumer
                queue.put_nowait(exc)

        producer = asyncio.create_task(produce())
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, Finish):
                    yield item
                    return
                batch = [item]
                while not queue.empty():
                    nxt = queue.get_nowait()
                    if isinstance(nxt, str):
                        batch.append(nxt)
                        continue
                    yield batch
                    if isinstance(nxt, BaseException):
                        raise nxt
                    yield nxt
                    return
                yield batch
        finally:
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await producer

    async def _execute(self, run: Running, task: dict[str, Any]) -> None:
        task_id = run.task_id
        key = task[F.STREAM]
        started = time.monotonic()
        response = ""
        finish: Finish | None = None
        error: str | None = None
        requeue = False
        last_refresh = 0.0
        last_item = time.monotonic()
        refreshed_len = 0
        deadline = task.get(F.DEADLINE)
        embeddings: Embeddings | None = None
        try:
            request = self._request(task)
            if task.get(F.KIND) == TaskKind.EMBED.value:
                embeddings = await self._embed(run, task, request.model)
                raise _Done
            tokens = self._tokens(run, request)
            stop_wait = asyncio.create_task(run.stop.wait())
            held = ""  # pieces not written yet: at most one stream write per STREAM_INTERVAL
            last_write = 0.0
            nxt: asyncio.Future[Any] | None = None
            try:
                while True:
                    if nxt is None:
                        nxt = asyncio.ensure_future(tokens.__anext__())
                    wait = last_write + STREAM_INTERVAL - time.monotonic() if held else None
                    await asyncio.wait({nxt, stop_wait}, timeout=wait,
                                       return_when=asyncio.FIRST_COMPLETED)
                    if held and not nxt.done() and not stop_wait.done():
                        last_write = time.monotonic()
                        last_refresh, refreshed_len = self._write(
                            task_id, task, key, response, held, last_refresh, refreshed_len)
                        held = ""
                        continue
                    if not nxt.done():
                        nxt.cancel()
                        with contextlib.suppress(BaseException):
                            await nxt
                        break
                    try:
                        item = nxt.result()
                    except StopAsyncIteration:
                        break
                    nxt = None
                    if time.monotonic() - last_item > 2 * self.agent.heartbeat:
                        # Paused (or starved) long enough to be counted gone: the task may
                        # have moved on. Read what arrived before writing anything.
                        await asyncio.sleep(STALL_SETTLE)
                        if run.stop_reason:
                            break
                    last_item = time.monotonic()
                    if isinstance(item, Finish):
                        finish = item
                        break
                    piece = "".join(item)
                    response += piece
                    held += piece
                    now = time.monotonic()
                    if now - last_write >= STREAM_INTERVAL:
                        last_write = now
                        last_refresh, refreshed_len = self._write(
                            task_id, task, key, response, held, last_refresh, refreshed_len)
                        held = ""
                    if deadline and now_ms() > float(deadline):
                        self._stop(run, "the task passed its deadline while running")
                        break
            finally:
                stop_wait.cancel()
                await tokens.aclose()
        except _Done:
            pass
        except EngineUnavailable as exc:
            error = str(exc)
            self.available = False  # busy at once, before the task is handed back
            self._publish()
            requeue = self._another_can_serve(task)
        except EngineError as exc:
            error = str(exc)
        except Exception as exc:  # an engine bug must not kill the worker
            log.exception("%s: task %s: engine error", self.agent.name, task_id)
            error = f"engine error: {type(exc).__name__}: {exc}"
        finally:
            self.running.pop(task_id, None)
        elapsed = time.monotonic() - started
        reason = run.stop_reason
        if reason == "lost":
            log.info("%s: task %s was taken away; stopped", self.agent.name, task_id)
            with self.agent.transaction():
                discard(self.streams, key)
        elif reason == DELETED:
            log.warning("%s: task %s: its entry in doing was deleted by another agent while "
                        "it ran; ended failed", self.agent.name, task_id)
            self._finish(task_id, task, key, State.FAILED, response, error=(
                "the task's entry in doing was deleted by another agent while it ran"),
                entry=task)
        elif requeue:
            log.warning("%s: task %s handed back: %s", self.agent.name, task_id, error)
            self._requeue(task_id, task, key)
        elif error is not None:
            log.warning("%s: task %s failed: %s", self.agent.name, task_id, error)
            self._finish(task_id, task, key, State.FAILED, response, error=error)
        elif reason == "aborted":
            log.info("%s: task %s aborted after %d characters", self.agent.name, task_id,
                     len(response))
            self._finish(task_id, task, key, State.ABORTED, response)
        elif reason is not None:
            self._finish(task_id, task, key, State.FAILED, response, error=reason)
        elif embeddings is not None:
            self.completed += 1
            log.info("%s: task %s done (%d embeddings, %.2f s)", self.agent.name, task_id,
                     len(embeddings.vectors), elapsed)
            self._finish(task_id, task, key, State.DONE, "", embeddings=embeddings)
        else:
            assert finish is not None or response == ""
            finish = finish or Finish("stop")
            if finish.completion_tokens and elapsed > 0:
                rate = finish.completion_tokens / elapsed
                self.speed = rate if self.speed is None else 0.7 * self.speed + 0.3 * rate
            self.completed += 1
            log.info("%s: task %s done (%d tokens, %.2f s)", self.agent.name, task_id,
                     finish.completion_tokens, elapsed)
            self._finish(task_id, task, key, State.DONE, response, finish=finish)
        self._advert_changed()
        self._scan_all = True  # a slot is free: tasks may wait for it
        self._wake.set()

    async def _embed(self, run: Running, task: dict[str, Any], model: str | None) -> Embeddings:
        """Run an embed task; stops early (without an answer) if the task is aborted."""
        dims = task.get(F.DIMENSIONS)
        job = asyncio.ensure_future(self.engine.embed(
            list(task[F.INPUTS]), model=model,
            dimensions=int(dims) if isinstance(dims, (int, float)) else None))
        stop_wait = asyncio.ensure_future(run.stop.wait())
        try:
            await asyncio.wait({job, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_wait.cancel()
        if not job.done():
            job.cancel()
            with contextlib.suppress(BaseException):
                await job
            raise _Done
        return job.result()

    def _another_can_serve(self, task: dict[str, Any]) -> bool:
        """Whether a task this worker cannot run now should go back to ``todos``: only if
        another worker that is not busy serves its model and attempts are left. Otherwise
        it ends ``failed`` here with the engine's reason rather than wait for its deadline."""
        if int(task.get(F.ATTEMPTS) or 1) >= HANDBACK_ATTEMPTS:
            return False
        peers = self.agent.peers()
        model, needs = model_for(task, peers), required(task)
        return any(p.id != self.agent.id and fits(p, model, needs)
                   and p.state.get(A.STATE) != AgentState.BUSY.value
                   for p in peers)

    def _write(self, task_id: str, task: dict[str, Any], key: str, response: str, piece: str,
               last_refresh: float, refreshed_len: int) -> tuple[float, int]:
        """Append ``piece`` to the task's stream, and refresh the compatibility fields when
        due; return the new (last refresh time, length refreshed)."""
        now = time.monotonic()
        refreshed = (last_refresh, refreshed_len)
        with self.agent.transaction():
            # Look the stream up at each write, never keep it across awaits:
            # writing to a Text another peer replaced or deleted crashes
            # pycrdt (use after free). Gone or replaced: the final answer in
            # done still carries the whole text.
            text = self.streams.get(key)
            if isinstance(text, Text):
                text += piece
            if (now - last_refresh >= self.compat_interval
                    and len(response) >= refreshed_len * COMPAT_GROWTH
                    and self._original_readers(now)):
                self._refresh(task_id, task, response, piece)
                refreshed = (now, len(response))
        return refreshed

    def _original_readers(self, now: float) -> bool:
        """Whether an agent of the original protocol (no ``protocol`` field in its
        awareness) is in the room: only such readers need ``doing[id].response``. Looked
        up at most once a second."""
        if now - self._readers_checked >= 1.0:
            self._readers_checked = now
            self._readers = any(not p.igora for p in self.agent.peers())
        return self._readers

    def _refresh(self, task_id: str, task: dict[str, Any], response: str, piece: str) -> None:
        current = self.doing.get(task_id)
        if not isinstance(current, dict) or current.get(F.WORKER) != self.agent.id:
            return
        self.doing[task_id] = {
            **current,
            F.RESPONSE: response,
            F.DELTA: {"role": "assistant", "content": piece},
            F.CHUNK_DATE: now_ms(),
        }

    def _mine(self, task_id: str) -> dict[str, Any] | None:
        current = self.doing.get(task_id)
        if isinstance(current, dict) and current.get(F.WORKER) == self.agent.id:
            return current
        return None

    def _finish(
        self,
        task_id: str,
        task: dict[str, Any],
        key: str,
        state: State,
        response: str,
        *,
        error: str | None = None,
        finish: Finish | None = None,
        entry: dict[str, Any] | None = None,
        embeddings: Embeddings | None = None,
    ) -> None:
        """End a running task in ``done``, if its ``doing`` entry still names this worker
        (or, given ``entry``, from that entry: its doing entry was deleted)."""
        with self.agent.transaction():
            current = entry if entry is not None else self._mine(task_id)
            discard(self.streams, key)
            if current is None:
                return  # someone else (the broker) already ended or moved it
            self._drop_entries(task_id)
            end = now_ms()
            final: dict[str, Any] = {
                **current,
                F.STATE: state.value,
                F.RESPONSE: response,
                F.END: end,
                F.DURATION: end - float(current.get(F.START) or end),
            }
            final.pop(F.DELTA, None)
            if state == State.ABORTED:
                final[F.ABORTED] = final.get(F.ABORTED) or ABORTED_MARK
            if error:
                final[F.ERROR] = error
            if finish:
                final[F.FINISH_REASON] = finish.reason
                final[F.USAGE] = {
                    "promptTokens": finish.prompt_tokens,
                    "completionTokens": finish.completion_tokens,
                }
                for name, value in ((F.TOOL_CALLS, finish.tool_calls),
                                    (F.LOGPROBS_RESULT, finish.logprobs),
                                    (F.CHOICES, finish.choices)):
                    if value:
                        final[name] = value
            if embeddings is not None:
                final[F.EMBEDDINGS] = embeddings.vectors
                final[F.USAGE] = {"promptTokens": embeddings.prompt_tokens,
                                  "completionTokens": 0}
            self.done[task_id] = final

    def _finish_from(self, source: MapName, task_id: str, task: Any, state: State,
                     *, error: str, code: ErrorCode | None = None) -> None:
        """End a task this worker did not start (found in ``source``)."""
        base = dict(task) if isinstance(task, dict) else {}
        end = now_ms()
        extra = {F.ERROR_CODE: code.value} if code is not None else {}
        with self.agent.transaction():
            self.agent.maps[source].pop(task_id, None)
            self._drop_entries(task_id)
            final = {**base, F.ID: task_id, F.STATE: state.value, F.ERROR: error, F.END: end,
                     **extra}
            if state == State.ABORTED:
                final[F.ABORTED] = base.get(F.ABORTED) or ABORTED_MARK
            self.done[task_id] = final

    def _drop_entries(self, task_id: str) -> None:
        """Whoever ends a task removes every entry under its id in todos, prepared and
        doing: a write that raced with a move may have left one behind."""
        for name in LIVE:
            discard(self.agent.maps[name], task_id)
        self._ended[task_id] = None
        if len(self._ended) > REMEMBER_ENDED:
            del self._ended[next(iter(self._ended))]

    def _requeue(self, task_id: str, task: dict[str, Any], key: str) -> None:
        with self.agent.transaction():
            current = self._mine(task_id)
            discard(self.streams, key)
            if current is None:
                return
            discard(self.doing, task_id)
            back = {k: v for k, v in current.items()
                    if k not in (F.WORKER, F.RESPONSE, F.DELTA, F.CHUNK_DATE, F.STREAM)}
            back[F.STATE] = State.TODO.value
            self.todos[task_id] = back
