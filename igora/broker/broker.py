"""``igora broker``: assigns each waiting task to a fitting worker, when it is the active
broker of the room, and applies the recovery policies (see ``policies``)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from functools import partial
from typing import Any

from pycrdt import Text

from .. import lifecycle
from ..agent import Agent, discard
from ..protocol import (
    AgentField,
    AgentState,
    AgentType,
    MapName,
    TaskField,
    now_ms,
)
from ..replica import RoomMaps
from . import policies
from .fairness import Fairness
from .leader import Leadership
from .matching import Kind, free_slots, kind_of, pick_for
from .presence import DEFAULT_GRACE, Presence
from .unservable import UNSERVABLE_AFTER, Unservables
from .view import WATCHED, TaskView

TICK = 0.5
RETENTION_EVERY = 5.0
SHUN_FOR = 120.0  # seconds a worker that left a task untaken gets no new one
FULL_READ_EVERY = 5.0  # seconds between two full reads of the maps (the view is kept from events)
POLICIES_EVERY = 0.1  # seconds between two runs of the recovery policies when nothing calls for one
PEERS_EVERY = 0.25  # seconds between two reads of the awareness states when none changed

log = logging.getLogger("igora.broker")


class Broker(RoomMaps):
    agent: Agent

    def __init__(
        self,
        agent: Agent,
        *,
        grace: float = DEFAULT_GRACE,
        max_attempts: int = policies.DEFAULT_MAX_ATTEMPTS,
        task_timeout: float = policies.DEFAULT_TIMEOUT,
        retention: float = policies.DEFAULT_RETENTION,
        claim_timeout: float = policies.DEFAULT_CLAIM_TIMEOUT,
    ) -> None:
        self.agent = agent
        self.presence = Presence(agent, grace)
        self.leadership = Leadership(agent, self.presence)
        self.fairness = Fairness()
        self.max_attempts = max_attempts
        self.task_timeout = task_timeout
        self.retention = retention
        self.claim_timeout = claim_timeout
        # Workers that did not take a task assigned to them get none for a while.
        self.shunned: dict[str, float] = {}
        # Others count this broker gone after 3 silent heartbeats; a gap of 2 between two
        # rounds means it may have been, and must not act on its old view.
        self.stall_limit = max(2 * agent.heartbeat, 2 * TICK)
        self.assigned = 0
        self._wake = asyncio.Event()
        self._last_retention = 0.0
        self._rejected: set[str] = set()
        self._abort_seen: dict[str, int] = {}
        self._unservables = Unservables()
        # The valid tasks of todos, prepared and doing (and the invalid ones, with why),
        # kept up to date from the maps' events: a round reads only what changed, not
        # every task of the room. A full read every FULL_READ_EVERY s is the safety net.
        self._view = TaskView()
        self._full_read_at = float("-inf")
        self._policies_at = float("-inf")
        self._policies_due = True
        self._peers_at = float("-inf")
        self._peers_due = True
        for name in WATCHED:
            agent.observe_keys(name, partial(self._on_map, name))
        agent.awareness.observe(self._on_awareness)

    def _on_awareness(self, topic: str, _change: Any) -> None:
        if topic == "change":
            self._peers_due = self._policies_due = True
            self._wake.set()

    def _on_map(self, name: MapName, changes: dict[str, dict[str, Any]]) -> None:
        wake, policies_due = self._view.update(name, changes)
        self._policies_due = self._policies_due or policies_due
        if wake:
            self._wake.set()

    async def run(self) -> None:
        last = time.monotonic()
        while True:
            self._wake.clear()
            now = time.monotonic()
            if now - last > self.stall_limit:
                self._resettle(now - last)
            last = now
            try:
                self.round()
            except Exception:  # one bad round must not stop the broker
                log.exception("%s: round failed", self.agent.name)
            # A timer rather than wait_for, which costs a task per round.
            tick = asyncio.get_running_loop().call_later(TICK, self._wake.set)
            await self._wake.wait()
            tick.cancel()

    def _resettle(self, gap: float) -> None:
        """This process was paused (SIGSTOP, swap, a debugger) or starved for ``gap``
        seconds: the others may have counted it gone and another broker may be active.
        Its view of who is present is outdated, so it steps down and judges nobody until
        it has heard the room again (one settle time, one grace)."""
        log.warning(
            "%s: stalled for %.1f s; stepping down and re-settling before acting",
            self.agent.name,
            gap,
        )
        self.presence.restart_clock()
        self.leadership.step_down()
        self._full_read_at = float("-inf")
        self._peers_due = self._policies_due = True

    # ------------------------------------------------------------------ one round
    def _full_read(self) -> None:
        self._view.read_all(self.agent)
        self._full_read_at = time.monotonic()

    def _read(self, source: MapName) -> dict[str, dict[str, Any]]:
        """Valid tasks of a map; invalid ones are ended (``failed``) with a log line."""
        for tid, (value, why) in list(self._view.invalid[source].items()):
            self._reject(source, tid, value, why)
        return dict(self._view.valid[source])

    def _reject(self, source: MapName, tid: str, value: Any, why: str) -> None:
        if tid not in self._rejected:
            if len(self._rejected) > 10_000:  # only there to log each offender once
                self._rejected.clear()
            log.warning(
                "%s: invalid task %r in %s: %s", self.agent.name, tid[:80], source.value, why
            )
            self._rejected.add(tid)
        if not self.leadership.leading:
            return
        step = lifecycle.reject(tid, value, now_ms(), why)
        with self.agent.transaction():
            self.agent.maps[source].pop(tid, None)
            self.agent.maps[step.map][tid] = step.task

    def round(self) -> None:
        if not self.agent.synced.is_set() or not self.agent.connected:
            return
        now = time.monotonic()
        if self._peers_due or now - self._peers_at >= PEERS_EVERY:
            self._peers_due, self._peers_at = False, now
            self.presence.refresh()
        if not self.leadership.decide():
            return
        if now - self._full_read_at >= FULL_READ_EVERY:
            self._full_read()
            self._policies_due = True
        snap = policies.Snapshot(
            self._read(MapName.TODOS), self._read(MapName.PREPARED), self._read(MapName.DOING)
        )
        moves: list[policies.Move] = []
        # The policies look at every task; they act on the clock, on agents leaving
        # (awareness) and on abort marks, so they need not run at every update.
        if self._policies_due or now - self._policies_at >= POLICIES_EVERY:
            self._policies_due, self._policies_at = False, now
            # An abort comes first: a re-queue or a deadline must not overwrite its mark.
            moves = (
                policies.abort(snap, self.presence.present, self._abort_seen)
                + policies.stale_copies(snap)
                + policies.expire(snap, self.task_timeout)
                + policies.recover(snap, self.presence.present, self.max_attempts)
                + self._unclaimed(snap)
            )
        touched = self._apply(moves)
        # Never (again) a task marked aborted, or one with an entry further on: both are
        # the policies' to settle.
        self._assign(
            [
                t
                for tid, t in snap.todos.items()
                if tid not in touched
                and not t.get(TaskField.ABORTED)
                and tid not in snap.prepared
                and tid not in snap.doing
            ],
            {**snap.prepared, **snap.doing},
            touched,
        )
        if time.monotonic() - self._last_retention > RETENTION_EVERY:
            self._last_retention = time.monotonic()
            self._retain()

    def _unclaimed(self, snap: policies.Snapshot) -> list[policies.Move]:
        # A worker that says its engine is unavailable keeps its tasks on purpose (it hands
        # them back itself when another worker can serve them).
        busy = {
            p.id
            for p in self.presence.peers
            if p.state.get(AgentField.STATE) == AgentState.BUSY.value
        }
        moves = [
            mv
            for mv in policies.unclaimed(snap, self.claim_timeout, self.max_attempts)
            if snap.prepared[mv.task_id].get(TaskField.WORKER) not in busy
        ]
        now = time.monotonic()
        self.shunned = {w: until for w, until in self.shunned.items() if until > now}
        for mv in moves:
            worker = snap.prepared[mv.task_id].get(TaskField.WORKER)
            if isinstance(worker, str) and self.shunned.get(worker, 0.0) < time.monotonic():
                log.warning(
                    "%s: worker %s does not take the tasks assigned to it; none for %g s",
                    self.agent.name,
                    worker[:80],
                    SHUN_FOR,
                )
                self.shunned[worker] = time.monotonic() + SHUN_FOR
        return moves

    def _apply(self, moves: list[policies.Move]) -> set[str]:
        touched: set[str] = set()
        if not moves:
            return touched
        with self.agent.transaction():
            for mv in moves:
                if mv.task_id in touched:
                    continue
                touched.add(mv.task_id)
                if mv.source is not None:
                    discard(self.agent.maps[mv.source], mv.task_id)
                for stale in mv.stale:
                    discard(self.agent.maps[stale], mv.task_id)
                if mv.target is not None and mv.task is not None:
                    self.agent.maps[mv.target][mv.task_id] = self._with_text(mv, mv.task)
                if mv.drop_stream:
                    discard(self.streams, mv.drop_stream)
                log.info("%s: task %s %s", self.agent.name, mv.task_id, mv.why)
        return touched

    def _with_text(self, mv: policies.Move, task: dict[str, Any]) -> dict[str, Any]:
        """A task the broker ends while it runs (its deadline, its asker gone, its worker
        lost for good) keeps the text streamed so far as its ``response``, as it would
        had its worker ended it: the stream goes with the move."""
        if mv.target is not MapName.DONE or not mv.drop_stream or task.get(TaskField.RESPONSE):
            return task
        text = self.streams.get(mv.drop_stream)
        return {**task, TaskField.RESPONSE: str(text)} if isinstance(text, Text) else task

    def _assign(
        self, waiting: list[dict[str, Any]], busy: dict[str, dict[str, Any]], touched: set[str]
    ) -> None:
        if not waiting:
            return
        now = time.monotonic()
        present = self.presence.of_type(AgentType.WORKER)
        self._fail_unservable(waiting, present, now)
        workers = [p for p in present if self.shunned.get(p.id or "", 0.0) < now]
        if not workers:
            return
        load: Counter[str] = Counter()
        in_flight: Counter[str] = Counter()
        for tid, task in busy.items():
            if tid in touched:
                continue
            load[str(task.get(TaskField.WORKER))] += 1
            in_flight[str(task.get(TaskField.ASKER) or "")] += 1
        writes = []
        workers = [w for w in workers if free_slots(w, load) > 0]
        # Within a round workers only fill up: a kind of task no worker had a slot for is
        # not matched again for each of its waiting tasks.
        unfit: set[Kind] = set()
        for task in self.fairness.order(waiting, in_flight):
            if not workers:  # every slot taken: the rest waits
                break
            kind = kind_of(task, present)
            worker = None if kind in unfit else pick_for(kind, workers, load)
            if worker is None:
                unfit.add(kind)
                continue
            load[worker.id or ""] += 1
            if free_slots(worker, load) <= 0:
                workers.remove(worker)
            self.fairness.record(task)
            step = lifecycle.assign(task, str(worker.id), self.agent.id, now_ms())
            writes.append((task, step, worker))
        if not writes:
            return
        with self.agent.transaction():
            for task, step, _worker in writes:
                discard(self.todos, task[TaskField.ID])
                self.agent.maps[step.map][task[TaskField.ID]] = step.task
        self.assigned += len(writes)
        for task, _step, worker in writes:
            log.info(
                "%s: task %s assigned to %s (model %s)",
                self.agent.name,
                task[TaskField.ID],
                worker.name,
                task.get(TaskField.MODEL) or "any",
            )

    def _fail_unservable(
        self, waiting: list[dict[str, Any]], present: list[Any], now: float
    ) -> None:
        """End ``failed`` (with a typed ``errorCode``) the waiting tasks that no worker
        present could serve (``unservable``). Judged only while some worker is present
        and this broker has heard the room for a grace: a market restart (everyone
        reconnecting) fails nothing."""
        if not present or not self.presence.settled():
            return
        failures, pending = self._unservables.judge(waiting, present, self.presence.version, now)
        if pending:  # wake to judge the rest
            asyncio.get_running_loop().call_later(UNSERVABLE_AFTER / 2, self._wake.set)
        if not failures:
            return
        end = now_ms()
        with self.agent.transaction():
            for task, why in failures:
                discard(self.todos, task[TaskField.ID])
                step = lifecycle.fail(task, end, why.code, why.reason)
                self.agent.maps[step.map][task[TaskField.ID]] = step.task
                log.info("%s: task %s failed: %s", self.agent.name, task[TaskField.ID], why.reason)
        failed = {task[TaskField.ID] for task, _why in failures}
        waiting[:] = [t for t in waiting if t[TaskField.ID] not in failed]

    def _retain(self) -> None:
        now = now_ms()
        done = {k: v for k, v in self.done.items()}
        old = policies.retain(done, now, self.retention)
        live_streams = {t.get(TaskField.STREAM) for t in self.doing.values() if isinstance(t, dict)}
        orphans = [k for k in list(self.streams.keys()) if k not in live_streams]
        if not old and not orphans:
            return
        with self.agent.transaction():
            for tid in old:
                discard(self.done, tid)
            for key in orphans:
                discard(self.streams, key)
        if old:
            log.info(
                "%s: %d finished task(s) left the live document (archived by the market)",
                self.agent.name,
                len(old),
            )
