"""The task's transitions (igora.lifecycle), one table: no process, no document."""

from __future__ import annotations

from typing import Any

import pytest

from igora import lifecycle
from igora.protocol import ABORTED_MARK, ErrorCode, MapName, State, TaskField, validate_task
from igora.task_handle import RESTART_TEXT, Watch, error_code

NOW = 1_000_000
WORKER, BROKER = "worker-1", "broker-1"


def waiting(**extra: Any) -> dict[str, Any]:
    return {
        TaskField.ID: "t",
        TaskField.STATE: State.TODO.value,
        TaskField.PROMPT: "hi",
        TaskField.DATE: NOW - 5_000,
        TaskField.ASKER: "asker",
        TaskField.PROTOCOL: 2,
        "custom": "kept",
        **extra,
    }


def running(**extra: Any) -> dict[str, Any]:
    return {
        **waiting(),
        TaskField.STATE: State.DOING.value,
        TaskField.WORKER: WORKER,
        TaskField.ATTEMPTS: 1,
        TaskField.START: NOW - 2_000,
        TaskField.BROKER: BROKER,
        TaskField.STREAM: "t#1",
        TaskField.RESPONSE: "so far",
        TaskField.DELTA: {"role": "assistant", "content": "far"},
        TaskField.CHUNK_DATE: NOW - 10,
        **extra,
    }


# name: (step, map expected, fields expected (None: absent))
CASES: dict[str, tuple[lifecycle.Step, MapName, dict[str, Any]]] = {
    "assign, first time": (
        lifecycle.assign(waiting(), WORKER, BROKER, NOW),
        MapName.PREPARED,
        {
            TaskField.STATE: "prepared",
            TaskField.WORKER: WORKER,
            TaskField.ATTEMPTS: 1,
            TaskField.START: NOW,
            TaskField.BROKER: BROKER,
        },
    ),
    "assign, after a re-queue": (
        lifecycle.assign(waiting(**{TaskField.ATTEMPTS: 2}), WORKER, BROKER, NOW),
        MapName.PREPARED,
        {TaskField.ATTEMPTS: 3},
    ),
    "start keeps the assignment time": (
        lifecycle.start({**waiting(), TaskField.START: NOW - 7}, WORKER, "t#1", NOW),
        MapName.DOING,
        {
            TaskField.STATE: "doing",
            TaskField.STREAM: "t#1",
            TaskField.RESPONSE: "",
            TaskField.START: NOW - 7,
        },
    ),
    "start of a task assigned without start": (
        lifecycle.start(waiting(), WORKER, "t#1", NOW),
        MapName.DOING,
        {TaskField.START: NOW},
    ),
    "requeue strips the run": (
        lifecycle.requeue(running()),
        MapName.TODOS,
        {
            TaskField.STATE: "todo",
            TaskField.ATTEMPTS: 1,
            TaskField.BROKER: BROKER,
            **dict.fromkeys(lifecycle.RUN_FIELDS),
        },
    ),
    "finish": (
        lifecycle.finish(
            running(),
            NOW,
            "the answer",
            **{
                TaskField.FINISH_REASON: "stop",
                TaskField.USAGE: lifecycle.usage(3, 4),
                TaskField.TOOL_CALLS: None,
            },
        ),
        MapName.DONE,
        {
            TaskField.STATE: "done",
            TaskField.RESPONSE: "the answer",
            TaskField.END: NOW,
            TaskField.DURATION: 2_000,
            TaskField.FINISH_REASON: "stop",
            TaskField.USAGE: {"promptTokens": 3, "completionTokens": 4},
            TaskField.TOOL_CALLS: None,
            TaskField.DELTA: None,
            TaskField.ERROR_CODE: None,
        },
    ),
    "fail keeps the text so far": (
        lifecycle.fail(running(), NOW, ErrorCode.ENGINE_ERROR, "boom", response="so"),
        MapName.DONE,
        {
            TaskField.STATE: "failed",
            TaskField.ERROR: "boom",
            TaskField.ERROR_CODE: "engine_error",
            TaskField.RESPONSE: "so",
        },
    ),
    "abort of a waiting task": (
        lifecycle.abort(waiting(), NOW),
        MapName.DONE,
        {
            TaskField.STATE: "aborted",
            TaskField.ABORTED: ABORTED_MARK,
            TaskField.ERROR_CODE: "aborted",
            TaskField.ERROR: None,
            TaskField.DURATION: 5_000,
        },
    ),
    "abort before it started, with a reason": (
        lifecycle.abort(waiting(**{TaskField.ABORTED: ABORTED_MARK}), NOW, error="why"),
        MapName.DONE,
        {TaskField.STATE: "aborted", TaskField.ERROR: "why", TaskField.ERROR_CODE: "aborted"},
    ),
    "expire while waiting": (
        lifecycle.expire(waiting(), NOW, running=False),
        MapName.DONE,
        {
            TaskField.STATE: "failed",
            TaskField.ERROR_CODE: "deadline",
            TaskField.ERROR: "deadline passed while waiting (no answer in time)",
        },
    ),
    "expire while running": (
        lifecycle.expire(running(), NOW, running=True),
        MapName.DONE,
        {
            TaskField.ERROR: "deadline passed while running (no answer in time)",
            TaskField.RESPONSE: "so far",
        },
    ),
    "doing entry deleted": (
        lifecycle.doing_deleted(running(), NOW, "partial"),
        MapName.DONE,
        {
            TaskField.STATE: "failed",
            TaskField.ERROR_CODE: "doing_deleted",
            TaskField.RESPONSE: "partial",
        },
    ),
    "invalid value keeps only what names its asker": (
        lifecycle.reject(
            "t",
            {TaskField.ASKER: "a", TaskField.CLIENT_ID: 7, TaskField.PROMPT: "x" * 10},
            NOW,
            "bad",
        ),
        MapName.DONE,
        {
            TaskField.ID: "t",
            TaskField.STATE: "failed",
            TaskField.ERROR: "invalid task: bad",
            TaskField.ERROR_CODE: "invalid_task",
            TaskField.ASKER: "a",
            TaskField.CLIENT_ID: 7,
            TaskField.PROMPT: None,
        },
    ),
    "invalid value that is no object": (
        lifecycle.reject("t", [1, 2], NOW, "not an object"),
        MapName.DONE,
        {TaskField.ID: "t", TaskField.ASKER: None, TaskField.END: NOW},
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
    state = State(step.task[TaskField.STATE])
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
        code = step.task.get(TaskField.ERROR_CODE)
        if step.task[TaskField.STATE] == State.DONE.value:
            assert code is None
        else:
            assert ErrorCode(code)


# final task -> the code the client reads (None: unclassified)
CODES: list[tuple[dict[str, Any], ErrorCode | None]] = [
    (
        {TaskField.STATE: "failed", TaskField.ERROR_CODE: "deadline", TaskField.ERROR: "reworded"},
        ErrorCode.DEADLINE,
    ),
    (
        {
            TaskField.STATE: "failed",
            TaskField.ERROR_CODE: "engine_error",
            TaskField.ERROR: "deadline in text",
        },
        ErrorCode.ENGINE_ERROR,
    ),
    ({TaskField.STATE: "failed", TaskField.ERROR_CODE: "from_a_later_version"}, None),
    # a task from before the codes: read by its own deadline, never by its sentence
    (
        {
            TaskField.STATE: "failed",
            TaskField.ERROR: "too late",
            TaskField.DEADLINE: 10,
            TaskField.END: 11,
        },
        ErrorCode.DEADLINE,
    ),
    (
        {
            TaskField.STATE: "failed",
            TaskField.ERROR: "deadline passed",
            TaskField.DEADLINE: 10,
            TaskField.END: 9,
        },
        None,
    ),
    ({TaskField.STATE: "failed", TaskField.ERROR: "boom"}, None),
    ({TaskField.STATE: "aborted", TaskField.DEADLINE: 10, TaskField.END: 11}, None),
]


@pytest.mark.parametrize(("final", "code"), CODES)
def test_the_client_reads_the_code_not_the_sentence(
    final: dict[str, Any], code: ErrorCode | None
) -> None:
    assert error_code(final) is code


def test_a_watch_queues_pieces_only_for_a_caller_that_reads_them() -> None:
    """``chat`` without ``stream`` reads only the final state (whose text is the watch's
    ``delivered``): neither its pieces nor a restart's marker are queued for it."""
    streamed, whole = Watch("t", pieces=True), Watch("t", pieces=False)
    for watch in (streamed, whole):
        watch.feed(1, "Hel")
        watch.feed(1, "lo")
        watch.feed(2, "Hi")
    assert [streamed.queue.get_nowait() for _ in range(4)] == ["Hel", "lo", RESTART_TEXT, "Hi"]
    assert whole.queue.empty()
    assert whole.delivered == streamed.delivered == "Hi"
