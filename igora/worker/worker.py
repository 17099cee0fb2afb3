"""``igora worker``: runs the tasks the broker assigns to it, streaming tokens back.

A task in ``prepared`` whose ``worker`` is this worker's id is *claimed* (moved to
``doing``) when a slot is free. Tokens are appended to a ``Y.Text`` in ``streams``
(linear bytes on the wire; ``running.AnswerStream``). While agents of the original
protocol are in the room, the original fields of ``doing[id]`` (``response``, ``delta``,
``chunkDate``) are also refreshed at a bounded rate, so original readers follow along at
a cost that stays linear in the answer's length. The task ends in ``done`` as ``done``,
``failed`` (with ``error`` and ``errorCode``) or ``aborted``; every such write is a
transition of ``igora.lifecycle``, applied by ``moves.Moves``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from .. import lifecycle
from ..agent import Agent
from ..engines.base import (
    Engine,
    EngineError,
    EngineUnavailable,
)
from ..protocol import (
    AgentField,
    AgentState,
    ErrorCode,
    MapName,
    ProtocolError,
    TaskField,
    TaskKind,
    abort_asked,
    now_ms,
    task_of,
    validate_task,
)
from ..replica import RoomMaps
from .advert import Advertiser
from .fit import another_can_serve, cannot_serve
from .moves import ABORTED_UNSTARTED, Moves
from .outcome import Outcome, conclude
from .running import (
    COMPAT_INTERVAL,
    AnswerStream,
    Running,
    Stop,
    embed_inputs,
    request_for,
    stream_chat,
)

DEFAULT_MAX_TOKENS = 512  # for tasks that set no maxTokens: small models loop forever
HEALTH_INTERVAL = 5.0
STRAY_CHECK = 2.0  # seconds between two looks for tasks wrongly attributed to this worker
SCAN_EVERY = 1.0  # seconds: all of ``prepared`` is looked at, at least this often

log = logging.getLogger("igora.worker")

__all__ = ["DEFAULT_MAX_TOKENS", "Running", "Stop", "Worker"]


class Worker(RoomMaps):
    agent: Agent

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
        self.moves = Moves(agent)
        self.adverts = Advertiser(agent, self.advert)
        self._strays_checked = 0.0
        self._wake = asyncio.Event()
        # Only a task written to ``prepared`` for this worker can bring one to claim (a
        # freed slot wakes the loop itself, to look at all of ``prepared``): waking on every
        # update of the room would rescan ``prepared`` at every token any worker streams.
        self._assigned: set[str] = set()
        self._scan_all = True
        self._scanned_at = 0.0
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

    def advert(self) -> dict[str, Any]:
        busy = len(self.running)
        ready = self.available and busy < self.slots
        return {
            AgentField.STATE: AgentState.READY.value
            if ready
            else (AgentState.WORKING.value if self.available else AgentState.BUSY.value),
            AgentField.ENGINE: self.engine.kind,
            AgentField.MODELS: [m.advert() for m in self.engine.models()],
            AgentField.SLOTS: self.slots if self.available else 0,
            AgentField.RUNNING: busy,
            AgentField.SPEED: round(self.speed, 1) if self.speed else None,
        }

    # ------------------------------------------------------------------ main loop
    async def run(self) -> None:
        self.available = await self.engine.available()  # never advertise a dead upstream ready
        self.adverts.publish()
        health = asyncio.create_task(self._health_loop())
        try:
            while True:
                self._wake.clear()
                self._claim_assigned()
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
                log.warning(
                    "%s: engine %s",
                    self.agent.name,
                    "is back" if ok else "is unavailable; not taking tasks",
                )
                self.adverts.publish()
            await asyncio.sleep(HEALTH_INTERVAL)

    # ------------------------------------------------------------------ watching
    def _on_prepared(self, changes: dict[str, dict[str, Any]]) -> None:
        me = self.agent.id
        for key, change in changes.items():
            value = change.get("newValue")
            if isinstance(value, dict) and value.get(TaskField.WORKER) == me:
                self._assigned.add(key)
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
                run.halt(Stop.ABORTED)

    def _on_streams(self, changes: dict[str, dict[str, Any]]) -> None:
        for key, change in changes.items():
            if change.get("action") == "delete":
                tid = task_of(MapName.STREAMS.value, key)
                if tid in self.running:
                    self._moved.add(tid)

    def _on_doing(self, changes: dict[str, dict[str, Any]]) -> None:
        for key, change in changes.items():
            run = self.running.get(key)
            if run is None or run.stop_reason:
                continue
            value = change.get("newValue")
            if change.get("action") == "delete":
                self._deleted[key] = run  # lost, unless moved (see _after_transaction)
                run.halt(Stop.LOST)
            elif not isinstance(value, dict) or value.get(TaskField.WORKER) != self.agent.id:
                run.halt(Stop.LOST)
            elif value.get(TaskField.ABORTED):
                run.halt(Stop.ABORTED)

    def _after_transaction(self) -> None:
        """A doing entry deleted in a transaction that wrote its id nowhere else and left
        its stream was not moved (a broker's re-queue or end writes the task elsewhere and
        drops its stream in the same transaction, also when the market relays a backlog
        merged into one update): a buggy or hostile agent deleted it. Nobody else knows
        that the task was running, so this worker ends it."""
        if self._deleted:
            for key, run in self._deleted.items():
                if key not in self._moved and run.stop_reason is Stop.LOST:
                    run.stop_reason = Stop.DELETED
            self._deleted.clear()
        self._moved.clear()

    # ------------------------------------------------------------------ claiming
    def _candidates(self) -> list[tuple[str, Any]]:
        """Tasks of ``prepared`` that may be this worker's: all of them after a slot freed
        (and at least every SCAN_EVERY), else those assigned to it since the last look."""
        now = time.monotonic()
        if self._scan_all or now - self._scanned_at >= SCAN_EVERY:
            self._scan_all, self._scanned_at = False, now
            self._assigned.clear()
            return list(self.prepared.items())
        ids, self._assigned = self._assigned, set()
        return [(tid, self.prepared.get(tid)) for tid in ids]

    def _claim_assigned(self) -> None:
        """Claim (start) the tasks assigned to this worker, as many as slots are free."""
        if not self.agent.synced.is_set():
            return
        candidates = self._candidates()
        if candidates:
            # The tasks taken in one look start in one transaction: one update for all.
            with self.agent.transaction():
                for task_id, value in candidates:
                    if len(self.running) >= self.slots:
                        return
                    if (
                        isinstance(value, dict)
                        and value.get(TaskField.WORKER) == self.agent.id
                        and task_id not in self.running
                    ):
                        self._claim(task_id, value)

    def _claim(self, task_id: str, value: dict[str, Any]) -> None:
        """Start a task assigned to this worker, or end it if it cannot run here."""
        now = now_ms()
        try:
            task = validate_task(value)
        except ProtocolError as exc:
            log.warning("%s: task %s rejected: %s", self.agent.name, task_id, exc)
            self.moves.end_unstarted(
                MapName.PREPARED, task_id, lifecycle.reject(task_id, value, now, str(exc))
            )
            return
        if abort_asked(task, self.todos.get(task_id), self.done.get(task_id)):
            self.moves.end_unstarted(
                MapName.PREPARED,
                task_id,
                lifecycle.abort(task, now, error=ABORTED_UNSTARTED),
            )
            return
        why = cannot_serve(self.engine, task, self.agent.name)
        if why is not None:
            self.moves.end_unstarted(
                MapName.PREPARED, task_id, lifecycle.fail(task, now, why[0], why[1])
            )
            return
        if not self.available:
            if another_can_serve(self.agent, task):  # assigned just before we went busy
                self.moves.hand_back(MapName.PREPARED, task_id, task)
            return
        self._start(task_id, task)

    def _start(self, task_id: str, task: dict[str, Any]) -> None:
        attempt = lifecycle.attempts(task)
        doing = self.moves.start(task_id, task, attempt)
        run = Running(task_id, attempt)
        self.running[task_id] = run
        log.info(
            "%s: task %s started (model %s, attempt %d)",
            self.agent.name,
            task_id,
            task.get(TaskField.MODEL) or "default",
            attempt,
        )
        run.job = asyncio.create_task(self._execute(run, doing))
        self.adverts.changed()

    def _hand_back_strays(self) -> None:
        self._strays_checked = time.monotonic()
        if self.agent.synced.is_set():
            self.moves.settle_strays(self.running)

    # ------------------------------------------------------------------ running
    async def _execute(self, run: Running, task: dict[str, Any]) -> None:
        answer = AnswerStream(
            self.agent,
            run.task_id,
            task[TaskField.STREAM],
            self.compat_interval,
            self._original_readers,
        )
        out = Outcome()
        started = time.monotonic()
        try:
            request = request_for(self.engine, task, self.max_tokens)
            if task.get(TaskField.KIND) == TaskKind.EMBED.value:
                out.embeddings = await embed_inputs(self.engine, run, task, request.model)
            else:
                out.finish = await stream_chat(
                    self.engine, run, task, request, answer, self.agent.heartbeat
                )
        except EngineUnavailable as exc:
            out.fail(ErrorCode.ENGINE_UNAVAILABLE, str(exc))
            self.available = False  # busy at once, before the task is handed back
            self.adverts.publish()
            out.requeue = another_can_serve(self.agent, task)
        except EngineError as exc:
            out.fail(ErrorCode.ENGINE_ERROR, str(exc))
        except Exception as exc:  # an engine bug must not kill the worker
            log.exception("%s: task %s: engine error", self.agent.name, run.task_id)
            out.fail(ErrorCode.ENGINE_ERROR, f"engine error: {type(exc).__name__}: {exc}")
        finally:
            self.running.pop(run.task_id, None)
        elapsed = time.monotonic() - started
        out.stop = run.stop_reason
        conclude(self.agent.name, self.moves, run.task_id, task, answer, out, elapsed)
        if out.answered and out.finish and out.finish.completion_tokens and elapsed > 0:
            rate = out.finish.completion_tokens / elapsed
            self.speed = rate if self.speed is None else 0.7 * self.speed + 0.3 * rate
        if out.answered:
            self.completed += 1
        self.adverts.changed()
        self._scan_all = True  # a slot is free: tasks may wait for it
        self._wake.set()

    def _original_readers(self, now: float) -> bool:
        """Whether an agent of the original protocol (no ``protocol`` field in its
        awareness) is in the room: only such readers need ``doing[id].response``. Looked
        up at most once a second."""
        if now - self._readers_checked >= 1.0:
            self._readers_checked = now
            self._readers = any(not p.igora for p in self.agent.peers())
        return self._readers
