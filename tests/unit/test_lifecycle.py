"""The task's transitions (igora.lifecycle), one table: no process, no document."""

from __future__ import annotations

from typing import Any

import pytest

from igora import lifecycle
from igora.protocol import ABORTED_MARK, ErrorCode, F, MapName, State, validate_task
from igora.task_handle import error_code

NOW = 1_000_000
WORKER, BROKER = "worker-1", "broker-1"


def waiting(**extra: Any) -> dict[str, Any]:
    return {
        F.ID: "t",
        F.STATE: State.TODO.value,
        F.PROMPT: "hi",
        F.DATE: NOW - 5_000,
        F.ASKER: "asker",
        F.PROTOCOL: 2,
        "custom": "kept",
        **extra,
    }


def running(**extra: Any) -> dict[str, Any]:
    return {
        **waiting(),
        F.STATE: State.DOING.value,
        F.WORKER: WORKER,
        F.ATTEMPTS: 1,
        F.START: NOW - 2_000,
        F.BROKER: BROKER,
        F.STREAM: "t#1",
        F.RESPONSE: "so far",
        F.DELTA: {"role": "assistant", "content": "far"},
        F.CHUNK_DATE: NOW - 10,
        **extra,
    }


# name: (step, map expected, fields expected (None: absent))
CASES: dict[str, tuple[lifecycle.Step, MapName, dict[str, Any]]] = {
    "assign, first time": (
        lifecycle.assign(waiting(), WORKER, BROKER, NOW),
        MapName.PREPARED,
        {F.STATE: "prepared", F.WORKER: WORKER, F.ATTEMPTS: 1, F.START: NOW, F.BROKER: BROKER},
    ),
    "assign, after a re-queue": (
        lifecycle.assign(waiting(**{F.ATTEMPTS: 2}), WORKER, BROKER, NOW),
        MapName.PREPARED,
        {F.ATTEMPTS: 3},
    ),
    "start keeps the assignment time": (
        lifecycle.start({**waiting(), F.START: NOW - 7}, WORKER, "t#1", NOW),
        MapName.DOING,
        {F.STATE: "doing", F.STREAM: "t#1", F.RESPONSE: "", F.START: NOW - 7},
    ),
    "start of a task assigned without start": (
        lifecycle.start(waiting(), WORKER, "t#1", NOW),
        MapName.DOING,
        {F.START: NOW},
    ),
    "requeue strips the run": (
        lifecycle.requeue(running()),
        MapName.TODOS,
        {F.STATE: "todo", F.ATTEMPTS: 1, F.BROKER: BROKER, **dict.fromkeys(lifecycle.RUN_FIELDS)},
    ),
    "finish": (
        lifecycle.finish(
            running(),
            NOW,
            "the answer",
            **{F.FINISH_REASON: "stop", F.USAGE: lifecycle.usage(3, 4), F.TOOL_CALLS: None},
        ),
        MapName.DONE,
        {
            F.STATE: "done",
            F.RESPONSE: "the answer",
            F.END: NOW,
            F.DURATION: 2_000,
            F.FINISH_REASON: "stop",
            F.USAGE: {"promptTokens": 3, "completionTokens": 4},
            F.TOOL_CALLS: None,
            F.DELTA: None,
            F.ERROR_CODE: None,
        },
    ),
    "fail keeps the text so far": (
        lifecycle.fail(running(), NOW, ErrorCode.ENGINE_ERROR, "boom", response="so"),
        MapName.DONE,
        {F.STATE: "failed", F.ERROR: "boom", F.ERROR_CODE: "engine_error", F.RESPONSE: "so"},
    ),
    "abort of a waiting task": (
        lifecycle.abort(waiting(), NOW),
        MapName.DONE,
        {
            F.STATE: "aborted",
            F.ABORTED: ABORTED_MARK,
            F.ERROR_CODE: "aborted",
            F.ERROR: None,
            F.DURATION: 5_000,
        },
    ),
    "abort before it started, with a reason": (
        lifecycle.abort(waiting(**{F.ABORTED: ABORTED_MARK}), NOW, error="why"),
        MapName.DONE,
        {F.STATE: "aborted", F.ERROR: "why", F.ERROR_CODE: "aborted"},
    ),
    "expire while waiting": (
        lifecycle.expire(waiting(), NOW, running=False),
        MapName.DONE,
        {
            F.STATE: "failed",
            F.ERROR_CODE: "deadline",
            F.ERROR: "deadline passed while waiting (no answer in time)",
        },
    ),
    "expire while running": (
        lifecycle.expire(running(), NOW, running=True),
        MapName.DONE,
        {F.ERROR: "deadline passed while running (no answer in time)", F.RESPONSE: "so far"},
    ),
    "doing entry deleted": (
        lifecycle.doing_deleted(running(), NOW, "partial"),
        MapName.DONE,
        {F.STATE: "failed", F.ERROR_CODE: "doing_deleted", F.RESPONSE: "partial"},
    ),
    "invalid value keeps only what names its asker": (
        lifecycle.reject("t", {F.ASKER: "a", F.CLIENT_ID: 7, F.PROMPT: "x" * 10}, NOW, "bad"),
        MapName.DONE,
        {
            F.ID: "t",
            F.STATE: "failed",
            F.ERROR: "invalid task: bad",
            F.ERROR_CODE: "invalid_task",
            F.ASKER: "a",
            F.CLIENT_ID: 7,
            F.PROMPT: None,
        },
    ),
    "invalid value that is no object": (
        lifecycle.reject("t", [1, 2], NOW, "not an object"),
        MapName.DONE,
        {F.ID: "t", F.ASKER: None, F.END: NOW},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_transition(case: str) -> None:
    step, where, fields = CASES[case]
    assert step.map is where
    for name, value in fields.items():
        if value is None:
            assert name not in step.task, name
        else:
            assert step.task[name] == value, name
    if "invalid" not in case:
        validate_task(step.task)  # every step writes a valid task
    state = State(step.task[F.STATE])
    assert state.map is where


@pytest.mark.parametrize("case", [c for c in CASES if "invalid" not in c])
def test_unknown_fields_are_kept(case: str) -> None:
    assert CASES[case][0].task["custom"] == "kept"


def test_a_transition_leaves_its_input_alone() -> None:
    task = running()
    before = dict(task)
    for step in (
        lifecycle.requeue(task),
        lifecycle.finish(task, NOW, "x"),
        lifecycle.abort(task, NOW),
        lifecycle.expire(task, NOW, running=True),
    ):
        assert step.task is not task
    assert task == before


def test_every_ending_but_done_has_a_code() -> None:
    endings = [step for step, where, _ in CASES.values() if where is MapName.DONE]
    for step in endings:
        code = step.task.get(F.ERROR_CODE)
        if step.task[F.STATE] == State.DONE.value:
            assert code is None
        else:
            assert ErrorCode(code)


# final task -> the code the client reads (None: unclassified)
CODES: list[tuple[dict[str, Any], ErrorCode | None]] = [
    ({F.STATE: "failed", F.ERROR_CODE: "deadline", F.ERROR: "reworded"}, ErrorCode.DEADLINE),
    (
        {F.STATE: "failed", F.ERROR_CODE: "engine_error", F.ERROR: "deadline in text"},
        ErrorCode.ENGINE_ERROR,
    ),
    ({F.STATE: "failed", F.ERROR_CODE: "from_a_later_version"}, None),
    # a task from before the codes: read by its own deadline, never by its sentence
    ({F.STATE: "failed", F.ERROR: "too late", F.DEADLINE: 10, F.END: 11}, ErrorCode.DEADLINE),
    ({F.STATE: "failed", F.ERROR: "deadline passed", F.DEADLINE: 10, F.END: 9}, None),
    ({F.STATE: "failed", F.ERROR: "boom"}, None),
    ({F.STATE: "aborted", F.DEADLINE: 10, F.END: 11}, None),
]


@pytest.mark.parametrize(("final", "code"), CODES)
def test_the_client_reads_the_code_not_the_sentence(
    final: dict[str, Any], code: ErrorCode | None
) -> None:
    assert error_code(final) is code
