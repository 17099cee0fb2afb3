"""Properties of the lifecycle and the broker's policies for any sequence of events.

A model market (four dicts, a clock, workers coming and going) is driven by hypothesis:
clients submit and abort, the broker assigns and runs its policies, workers start,
answer, fail, hand back or vanish. Every write is what the roles write: a transition of
``igora.lifecycle``, or the policies' moves applied as ``Broker._apply`` does (one id
moved at most once per round). After each event:

- no task is in two maps, and none is lost;
- no task was assigned more than ``MAX_ATTEMPTS`` times;
- a task in ``done`` never changes again (a final state is final);
- a task marked aborted while not running is ``aborted`` after the next broker round.
"""

from __future__ import annotations

from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from igora import lifecycle
from igora.broker import policies
from igora.protocol import (
    ABORTED_MARK,
    FINAL_VALUES,
    ErrorCode,
    MapName,
    State,
    TaskField,
    abort_asked,
    stream_key,
)

MAX_ATTEMPTS = 2  # small, so that short sequences exhaust it
WORKERS = ("w1", "w2")
ASKER = "asker"
LIVE_MAPS = (MapName.TODOS, MapName.PREPARED, MapName.DOING)


class Market(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.maps: dict[MapName, dict[str, dict[str, Any]]] = {
            m: {} for m in (*LIVE_MAPS, MapName.DONE)
        }
        self.now = 1_000_000
        self.present = set(WORKERS)
        self.ids: list[str] = []
        self.finals: dict[str, dict[str, Any]] = {}
        self.abort_seen: dict[str, int] = {}
        self.must_abort: set[str] = set()  # marked while not running: aborted next round

    # ------------------------------------------------------------------ helpers
    def where(self, tid: str) -> list[MapName]:
        return [m for m, tasks in self.maps.items() if tid in tasks]

    def pick(self, where: MapName, i: int) -> tuple[str, dict[str, Any]] | None:
        tasks = sorted(self.maps[where].items())
        return tasks[i % len(tasks)] if tasks else None

    def write(self, tid: str, source: MapName | None, step: lifecycle.Step) -> None:
        if source is not None:
            del self.maps[source][tid]
        self.maps[step.map][tid] = step.task

    # ------------------------------------------------------------------ clients
    @rule(deadline=st.sampled_from([1_000, 40_000, 300_000]))
    def submit(self, deadline: int) -> None:
        tid = f"t{len(self.ids)}"
        self.ids.append(tid)
        self.maps[MapName.TODOS][tid] = {
            TaskField.ID: tid,
            TaskField.STATE: State.TODO.value,
            TaskField.PROMPT: "p",
            TaskField.ASKER: ASKER,
            TaskField.DATE: self.now,
            TaskField.DEADLINE: self.now + deadline,
        }

    @rule(i=st.integers(0, 3))
    def abort(self, i: int) -> None:
        if not self.ids:
            return
        tid = self.ids[i % len(self.ids)]
        for m in LIVE_MAPS:
            if tid in self.maps[m]:
                self.maps[m][tid] = {**self.maps[m][tid], TaskField.ABORTED: ABORTED_MARK}
                if m is not MapName.DOING:
                    self.must_abort.add(tid)

    # ------------------------------------------------------------------ broker
    @rule(w=st.sampled_from(WORKERS))
    def assign(self, w: str) -> None:
        """The broker gives every waiting task it may assign to ``w``."""
        if w not in self.present:
            return
        for tid, task in sorted(self.maps[MapName.TODOS].items()):
            if not task.get(TaskField.ABORTED):
                self.write(tid, MapName.TODOS, lifecycle.assign(task, w, "broker", self.now))

    # steps of the clock around the policies' limits: claim 30 s, abort 1 s and 10 s
    @rule(ms=st.sampled_from([31_000, 0, 1_500, 11_000]))
    def broker_round(self, ms: int) -> None:
        self.now += ms
        todos, prepared, doing = (dict(self.maps[m]) for m in LIVE_MAPS)
        snap = policies.Snapshot(todos, prepared, doing, now=self.now)
        present = lambda who: who == ASKER or who in self.present  # noqa: E731
        moves = (
            policies.abort(snap, present, self.abort_seen)
            + policies.stale_copies(snap)
            + policies.expire(snap, 600.0)
            + policies.recover(snap, present, MAX_ATTEMPTS)
            + policies.unclaimed(snap, 30.0, MAX_ATTEMPTS)
        )
        touched: set[str] = set()
        for mv in moves:  # as Broker._apply
            if mv.task_id in touched:
                continue
            touched.add(mv.task_id)
            for m in (mv.source, *mv.stale):
                if m is not None:
                    self.maps[m].pop(mv.task_id, None)
            if mv.target is not None and mv.task is not None:
                self.maps[mv.target][mv.task_id] = mv.task
        for tid in self.must_abort:
            assert self.where(tid) == [MapName.DONE], tid
            assert self.maps[MapName.DONE][tid][TaskField.STATE] == State.ABORTED.value
        self.must_abort.clear()

    # ------------------------------------------------------------------ workers
    @rule(i=st.integers(0, 3))
    def start(self, i: int) -> None:
        picked = self.pick(MapName.PREPARED, i)
        if picked is None or picked[1][TaskField.WORKER] not in self.present:
            return
        tid, task = picked
        if abort_asked(task):  # a worker does not start a marked task
            self.write(tid, MapName.PREPARED, lifecycle.abort(task, self.now))
            return
        key = stream_key(tid, lifecycle.attempts(task))
        self.write(
            tid, MapName.PREPARED, lifecycle.start(task, task[TaskField.WORKER], key, self.now)
        )

    @rule(i=st.integers(0, 3), how=st.sampled_from(["finish", "fail", "requeue", "abort"]))
    def end(self, i: int, how: str) -> None:
        picked = self.pick(MapName.DOING, i)
        if picked is None or picked[1][TaskField.WORKER] not in self.present:
            return
        tid, task = picked
        if abort_asked(task):
            how = "abort"
        if how == "requeue" and lifecycle.attempts(task) >= MAX_ATTEMPTS:
            how = "fail"  # a worker hands back only while attempts are left
        step = {
            "finish": lambda: lifecycle.finish(
                task, self.now, "answer", **{TaskField.USAGE: lifecycle.usage(1, 1)}
            ),
            "fail": lambda: lifecycle.fail(task, self.now, ErrorCode.ENGINE_ERROR, "boom"),
            "requeue": lambda: lifecycle.requeue(task),
            "abort": lambda: lifecycle.abort(task, self.now, response="ans"),
        }[how]()
        self.write(tid, MapName.DOING, step)

    @rule(w=st.sampled_from(WORKERS))
    def toggle_worker(self, w: str) -> None:
        self.present ^= {w}

    # ------------------------------------------------------------------ properties
    @invariant()
    def one_map_each_none_lost(self) -> None:
        for tid in getattr(self, "ids", []):
            assert len(self.where(tid)) == 1, (tid, self.where(tid))

    @invariant()
    def attempts_bounded(self) -> None:
        for tasks in getattr(self, "maps", {}).values():
            for t in tasks.values():
                assert int(t.get(TaskField.ATTEMPTS) or 0) <= MAX_ATTEMPTS

    @invariant()
    def final_is_final(self) -> None:
        for tid, final in list(getattr(self, "finals", {}).items()):
            assert self.maps[MapName.DONE].get(tid) == final
        for tid, t in getattr(self, "maps", {}).get(MapName.DONE, {}).items():
            assert t[TaskField.STATE] in FINAL_VALUES
            assert (t[TaskField.STATE] == State.DONE.value) == (TaskField.ERROR_CODE not in t)
            self.finals.setdefault(tid, t)


Market.TestCase.settings = settings(
    max_examples=500, stateful_step_count=30, deadline=None, database=None
)
TestMarket = Market.TestCase
