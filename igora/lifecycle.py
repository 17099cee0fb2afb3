"""The task's lifecycle: every change of a task's state, as a pure function.

Each transition takes a task (a plain dict, left unchanged) and returns a ``Step``: the
map the task belongs in next and its new value. The roles decide *when* a task changes
(the broker's policies, a worker running it); *how* it changes lives here only, so every
role writes the same fields for the same transition (docs/protocol.md, 4.2)::

    todos --assign--> prepared --start--> doing --finish | fail | abort--> done
      ^                  |                  |
      +---- requeue -----+------------------+      (expire, fail, abort: from any live map)

A task that ends without an answer carries ``errorCode`` (an ``ErrorCode``) beside the
sentence in ``error``: programs test the code, people read the sentence.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .protocol import ABORTED_MARK, ErrorCode, MapName, State, TaskField
from .protocol import number as _number

RUN_FIELDS = (
    TaskField.WORKER,
    TaskField.RESPONSE,
    TaskField.DELTA,
    TaskField.CHUNK_DATE,
    TaskField.STREAM,
    TaskField.START,
)
"""The fields of one assignment and its run, stripped when a task goes back to ``todos``."""

_KEPT_OF_INVALID = (TaskField.ASKER, TaskField.CLIENT_ID)


class Step(NamedTuple):
    """Where a task goes (``map``) and what it is there (``task``)."""

    map: MapName
    task: dict[str, Any]


def number(task: dict[str, Any], name: str) -> float | None:
    """A numeric field of a task, or None (booleans are not numbers here)."""
    return _number(task.get(name))


def attempts(task: dict[str, Any]) -> int:
    """How many times the task was assigned (``attemps``); 1 for a task that says none
    but is past ``todos``."""
    return int(number(task, TaskField.ATTEMPTS) or 1)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The ``usage`` field of an answered task."""
    return {TaskField.PROMPT_TOKENS: prompt_tokens, TaskField.COMPLETION_TOKENS: completion_tokens}


# ---------------------------------------------------------------------- moving on
def assign(task: dict[str, Any], worker: str, broker: str, now: int) -> Step:
    """A waiting task given to ``worker`` by ``broker``: one more attempt."""
    return Step(
        MapName.PREPARED,
        {
            **task,
            TaskField.WORKER: worker,
            TaskField.STATE: State.PREPARED.value,
            TaskField.ATTEMPTS: int(number(task, TaskField.ATTEMPTS) or 0) + 1,
            TaskField.START: now,
            TaskField.BROKER: broker,
        },
    )


def start(task: dict[str, Any], worker: str, stream: str, now: int) -> Step:
    """An assigned task started by its worker, its answer to be appended to ``stream``."""
    return Step(
        MapName.DOING,
        {
            **task,
            TaskField.STATE: State.DOING.value,
            TaskField.WORKER: worker,
            TaskField.STREAM: stream,
            TaskField.RESPONSE: "",
            TaskField.START: task.get(TaskField.START) or now,
        },
    )


def requeue(task: dict[str, Any]) -> Step:
    """Back to ``todos``, for the broker to assign again; its attempts are kept."""
    back = {k: v for k, v in task.items() if k not in RUN_FIELDS}
    back[TaskField.STATE] = State.TODO.value
    return Step(MapName.TODOS, back)


# ---------------------------------------------------------------------- endings
def _ended(
    task: dict[str, Any], state: State, now: int, response: str | None, fields: dict[str, Any]
) -> Step:
    out = {k: v for k, v in task.items() if k != TaskField.DELTA}
    out[TaskField.STATE] = state.value
    if response is not None:
        out[TaskField.RESPONSE] = response
    out[TaskField.END] = now
    begin = number(task, TaskField.START) or number(task, TaskField.DATE)
    if begin is not None:
        out[TaskField.DURATION] = now - begin
    out.update(fields)
    return Step(MapName.DONE, out)


def finish(task: dict[str, Any], now: int, response: str, **results: Any) -> Step:
    """Answered: ``done`` with the text and the results given, by field name
    (``finishReason``, ``usage``, ``toolCalls``, ``embeddings``...; None ones left out)."""
    return _ended(
        task, State.DONE, now, response, {k: v for k, v in results.items() if v is not None}
    )


def fail(
    task: dict[str, Any], now: int, code: ErrorCode, error: str, *, response: str | None = None
) -> Step:
    """Ended without an answer: ``failed``, with the code and the sentence."""
    return _ended(
        task,
        State.FAILED,
        now,
        response,
        {TaskField.ERROR: error, TaskField.ERROR_CODE: code.value},
    )


def abort(
    task: dict[str, Any], now: int, *, response: str | None = None, error: str | None = None
) -> Step:
    """Stopped at its asker's request (or because the asker left): ``aborted``."""
    fields: dict[str, Any] = {
        TaskField.ABORTED: task.get(TaskField.ABORTED) or ABORTED_MARK,
        TaskField.ERROR_CODE: ErrorCode.ABORTED.value,
    }
    if error:
        fields[TaskField.ERROR] = error
    return _ended(task, State.ABORTED, now, response, fields)


def expire(task: dict[str, Any], now: int, *, running: bool) -> Step:
    """Its deadline passed before it ended."""
    where = "running" if running else "waiting"
    return fail(task, now, ErrorCode.DEADLINE, f"deadline passed while {where} (no answer in time)")


def doing_deleted(task: dict[str, Any], now: int, response: str) -> Step:
    """Its ``doing`` entry was deleted while it ran, moved nowhere: its worker ends it
    (nobody else knows it was running)."""
    return fail(
        task,
        now,
        ErrorCode.DOING_DELETED,
        "the task's entry in doing was deleted by another agent while it ran",
        response=response,
    )


def reject(task_id: str, value: Any, now: int, why: str) -> Step:
    """A value that is not a valid task, ended ``failed``: only its id and what tells its
    asker it is theirs are kept (the rest may be anything, of any size)."""
    base = value if isinstance(value, dict) else {}
    return Step(
        MapName.DONE,
        {
            TaskField.ID: task_id,
            TaskField.STATE: State.FAILED.value,
            TaskField.END: now,
            TaskField.ERROR: f"invalid task: {why}",
            TaskField.ERROR_CODE: ErrorCode.INVALID_TASK.value,
            **{k: base[k] for k in _KEPT_OF_INVALID if isinstance(base.get(k), (str, int, float))},
        },
    )


def refresh(task: dict[str, Any], response: str, piece: str, now: int) -> dict[str, Any]:
    """A running task's ``doing`` entry with the answer so far, for original readers
    (``response``, ``delta``, ``chunkDate``; docs/protocol.md, 4.3). It stays in doing."""
    return {
        **task,
        TaskField.RESPONSE: response,
        TaskField.DELTA: {"role": "assistant", "content": piece},
        TaskField.CHUNK_DATE: now,
    }
