"""The broker's policies over one snapshot of the market: no process, no document."""

from __future__ import annotations

from typing import Any

import pytest

from igora.broker import policies
from igora.broker.unservable import UNSERVABLE_AFTER, Unservables
from igora.protocol import AgentField, AgentType, ErrorCode, MapName, Peer, State, TaskField

NOW = 10_000_000
GONE, HERE = "gone-worker", "live-worker"


def task(
    tid: str,
    state: State,
    *,
    worker: str | None = HERE,
    attempts: int = 1,
    start: int = NOW - 1_000,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        TaskField.ID: tid,
        TaskField.STATE: state.value,
        TaskField.PROMPT: "p",
        TaskField.DATE: NOW - 5_000,
        TaskField.ASKER: "asker",
        TaskField.DEADLINE: NOW + 60_000,
        **(extra or {}),
    }
    if state is not State.TODO:
        out.update({TaskField.WORKER: worker, TaskField.ATTEMPTS: attempts, TaskField.START: start})
    if state is State.DOING:
        out[TaskField.STREAM] = f"{tid}#{attempts}"
    return out


def snap(*tasks: dict[str, Any], now: int = NOW) -> policies.Snapshot:
    maps: dict[str, dict[str, Any]] = {
        s.value: {} for s in (State.TODO, State.PREPARED, State.DOING)
    }
    for t in tasks:
        maps[t[TaskField.STATE]][t[TaskField.ID]] = t
    return policies.Snapshot(maps["todo"], maps["prepared"], maps["doing"], now=now)


def present(who: Any) -> bool:
    return bool(who != GONE)


# name: (task, expected source, target, state, errorCode)
RECOVER: dict[str, tuple[dict[str, Any], Any]] = {
    "running on a live worker": (task("t", State.DOING), None),
    "running on a vanished worker: re-queued": (
        task("t", State.DOING, worker=GONE),
        (MapName.DOING, MapName.TODOS, State.TODO, None),
    ),
    "assigned to a vanished worker: re-queued": (
        task("t", State.PREPARED, worker=GONE),
        (MapName.PREPARED, MapName.TODOS, State.TODO, None),
    ),
    "vanished worker, last attempt: failed": (
        task("t", State.DOING, worker=GONE, attempts=3),
        (MapName.DOING, MapName.DONE, State.FAILED, ErrorCode.WORKER_LOST),
    ),
}


@pytest.mark.parametrize("case", list(RECOVER))
def test_recover(case: str) -> None:
    t, expected = RECOVER[case]
    moves = policies.recover(snap(t), present, max_attempts=3)
    if expected is None:
        assert moves == []
        return
    [mv] = moves
    source, target, state, code = expected
    assert (mv.source, mv.target) == (source, target)
    assert mv.task is not None and mv.task[TaskField.STATE] == state.value
    assert mv.task.get(TaskField.ERROR_CODE) == (code.value if code else None)
    if source is MapName.DOING:
        assert mv.drop_stream == t[TaskField.STREAM]
    if target is MapName.TODOS:
        assert (
            TaskField.WORKER not in mv.task and mv.task[TaskField.ATTEMPTS] == t[TaskField.ATTEMPTS]
        )


UNCLAIMED: dict[str, tuple[dict[str, Any], Any]] = {
    "assigned a moment ago": (task("t", State.PREPARED, start=NOW - 1_000), None),
    "not started within the timeout: re-queued": (
        task("t", State.PREPARED, start=NOW - 31_000),
        (MapName.TODOS, None),
    ),
    "not started, last attempt: failed": (
        task("t", State.PREPARED, start=NOW - 31_000, attempts=3),
        (MapName.DONE, ErrorCode.NOT_STARTED),
    ),
}


@pytest.mark.parametrize("case", list(UNCLAIMED))
def test_unclaimed(case: str) -> None:
    t, expected = UNCLAIMED[case]
    moves = policies.unclaimed(snap(t), claim_timeout=30.0, max_attempts=3)
    if expected is None:
        assert moves == []
        return
    [mv] = moves
    assert mv.source is MapName.PREPARED and mv.target is expected[0]
    assert mv.task is not None
    assert mv.task.get(TaskField.ERROR_CODE) == (expected[1].value if expected[1] else None)


@pytest.mark.parametrize(
    ("state", "where"),
    [(State.TODO, "waiting"), (State.PREPARED, "waiting"), (State.DOING, "running")],
)
def test_expire(state: State, where: str) -> None:
    late = task("t", state, extra={TaskField.DEADLINE: NOW - 1})
    on_time = task("u", state)
    [mv] = policies.expire(snap(late, on_time), default_timeout=600.0)
    assert mv.task_id == "t" and mv.target is MapName.DONE and mv.task is not None
    assert mv.task[TaskField.ERROR_CODE] == ErrorCode.DEADLINE.value
    assert mv.task[TaskField.ERROR] == f"deadline passed while {where} (no answer in time)"


def test_expire_without_deadline_uses_the_default_timeout() -> None:
    old = task("t", State.TODO, extra={TaskField.DATE: NOW - 601_000})
    del old[TaskField.DEADLINE]
    young = task("u", State.TODO)
    del young[TaskField.DEADLINE]
    assert [mv.task_id for mv in policies.expire(snap(old, young), 600.0)] == ["t"]


def test_abort_of_a_task_whose_asker_left() -> None:
    t = task("t", State.TODO, extra={TaskField.ASKER: GONE})
    [mv] = policies.abort(snap(t), present, {})
    assert mv.task is not None and mv.task[TaskField.STATE] == State.ABORTED.value
    assert mv.task[TaskField.ERROR_CODE] == ErrorCode.ABORTED.value


def test_retain() -> None:
    done = {
        "old": {TaskField.END: NOW - 601_000},
        "new": {TaskField.END: NOW - 1_000},
        "dateless": {},
        "by-date": {TaskField.DATE: NOW - 700_000},
        "junk": 3,
    }
    assert sorted(policies.retain(done, NOW, 600.0)) == ["by-date", "dateless", "junk", "old"]


def test_unservable_tasks_fail_after_a_second_only() -> None:
    worker = Peer(
        1,
        {
            AgentField.ID: "w",
            AgentField.TYPE: AgentType.WORKER.value,
            AgentField.MODELS: [{"name": "m"}],
        },
    )
    v2 = {TaskField.ID: "a", TaskField.PROMPT: "p", TaskField.PROTOCOL: 2, TaskField.MODEL: "other"}
    original = {
        TaskField.ID: "b",
        TaskField.PROMPT: "p",
        TaskField.MODEL: "other",
    }  # any text worker answers it
    fine = {TaskField.ID: "c", TaskField.PROMPT: "p", TaskField.PROTOCOL: 2, TaskField.MODEL: "m"}
    judge = Unservables()
    assert judge.judge([v2, original, fine], [worker], 1, 100.0) == ([], True)
    failures, pending = judge.judge([v2, original, fine], [worker], 1, 100.0 + UNSERVABLE_AFTER)
    assert [(t[TaskField.ID], why.code) for t, why in failures] == [
        ("a", ErrorCode.MODEL_NOT_SERVED)
    ]
    assert not pending and judge.since == {}
    # a task that went away is forgotten; a re-queued one (attempts) is not judged
    assert judge.judge([{**v2, TaskField.ATTEMPTS: 1}], [worker], 2, 200.0) == ([], False)
