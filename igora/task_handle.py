"""A task put on the market by a ``Client``: its handle (``Task``), the answer read as
it comes (``Watch``), and its outcome (``Answer``, or the exception its ``errorCode``
names)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .aio import within
from .capabilities import unservable
from .errors import NotAdmitted, NoWorkerError, TaskAborted, TaskFailed, TaskTimeout
from .lifecycle import number
from .protocol import ErrorCode, State, TaskField

NOT_ADMITTED = "notAdmitted"
"""Field of a task's final state, kept in this process (never written to the market):
the identity the market stopped admitting while the task ran (a v3 asker sets it; the
task's waiter gets ``NotAdmitted``)."""

if TYPE_CHECKING:
    from .client import Client


class Restart(str):
    """Marker yielded in a stream when the task restarts from scratch on another worker
    (its first worker vanished); what follows replaces what came before."""

    __slots__ = ()


RESTART_TEXT = "\n[igora: the worker was lost; the answer restarts on another worker]\n"


@dataclass
class Answer:
    """A finished task: its text and what the worker said about it."""

    text: str
    finish_reason: str
    usage: dict[str, int]
    task: dict[str, Any]

    @property
    def model(self) -> str | None:
        return self.task.get(TaskField.MODEL)

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        """The tool calls of the (first) answer, in OpenAI's shape: ``[{"id", "type":
        "function", "function": {"name", "arguments"}}]`` (``arguments``: a JSON string)."""
        calls = self.task.get(TaskField.TOOL_CALLS)
        return list(calls) if isinstance(calls, list) else []

    @property
    def choices(self) -> list[dict[str, Any]]:
        """Every choice (n > 1): ``{"index", "content", "toolCalls", "finishReason",
        "tokenLogprobs"}``; one choice built from the answer otherwise."""
        choices = self.task.get(TaskField.CHOICES)
        if isinstance(choices, list) and choices:
            return list(choices)
        return [
            {
                "index": 0,
                "content": self.text,
                "toolCalls": self.tool_calls or None,
                "finishReason": self.finish_reason,
                TaskField.LOGPROBS_RESULT: self.logprobs,
            }
        ]

    @property
    def logprobs(self) -> dict[str, Any] | None:
        """Token log probabilities of the (first) answer, OpenAI's ``{"content": [...]}``."""
        value = self.task.get(TaskField.LOGPROBS_RESULT)
        return value if isinstance(value, dict) else None


@dataclass
class Watch:
    task_id: str
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    attempt: int = 0
    delivered: str = ""
    ended: bool = False
    pieces: bool = True  # the caller may read the answer piece by piece

    def feed(self, attempt: int, text: str) -> None:
        """Deliver new text of an attempt (whole-so-far or appended pieces): queued only
        for a caller that reads pieces (the final state carries the whole text)."""
        if attempt < self.attempt or self.ended:
            return
        if attempt > self.attempt:
            if self.delivered and self.pieces:
                self.queue.put_nowait(Restart(RESTART_TEXT))
            self.attempt, self.delivered = attempt, ""
        if text:
            self.delivered += text
            if self.pieces:
                self.queue.put_nowait(text)

    def feed_whole(self, attempt: int, whole: str) -> None:
        if attempt > self.attempt:
            self.feed(attempt, whole)
        elif attempt == self.attempt and whole.startswith(self.delivered):
            self.feed(attempt, whole[len(self.delivered) :])


async def _get_within(queue: asyncio.Queue[Any], seconds: float) -> Any:
    """``queue.get()`` or TimeoutError after ``seconds``; at once, without waiting, when
    the item is there already."""
    if not queue.empty():
        return queue.get_nowait()
    return await within(queue.get(), seconds)


class Task:
    """A task put on the market by a Client."""

    def __init__(self, client: Client, task: dict[str, Any], watch: Watch, timeout: float):
        self.client = client
        self.task = task
        self.id: str = task[TaskField.ID]
        self._watch = watch
        self._timeout = timeout
        self.final: dict[str, Any] | None = None

    async def events(self) -> AsyncIterator[str | dict[str, Any]]:
        """Text pieces, then the final task (a dict). Raises on failure."""
        loop = asyncio.get_running_loop()
        end = loop.time() + self._timeout + 5
        finished = False
        try:
            while True:
                left = end - loop.time()
                try:
                    item = await _get_within(self._watch.queue, max(left, 0.01))
                except asyncio.TimeoutError:
                    raise TaskTimeout(f"no answer within {self._timeout:g} s", self.task) from None
                if isinstance(item, dict):
                    finished = True
                    self.final = item
                    self._raise_for(item)
                    yield item
                    return
                yield item
        finally:
            if not finished:
                self.abort()
            self.client._forget(self.id)

    def _raise_for(self, final: dict[str, Any]) -> None:
        """The exception of a task that ended without an answer, chosen by its
        ``errorCode`` (``error`` is only the message)."""
        state = final.get(TaskField.STATE)
        if state == State.DONE.value:
            return
        error = str(final.get(TaskField.ERROR) or "")
        code = error_code(final)
        if code in (ErrorCode.MODEL_NOT_SERVED, ErrorCode.CAPABILITY_NOT_SERVED):
            why = unservable(self.task, self.client.workers())
            raise NoWorkerError(
                self.task.get(TaskField.MODEL),
                self.client.models(),
                why.missing if why else (),
                reason=error,
            )
        if isinstance(final.get(NOT_ADMITTED), str):
            raise NotAdmitted(error, final[NOT_ADMITTED])
        if state == State.ABORTED.value:
            raise TaskAborted(f"task {self.id} was aborted", final)
        if code is ErrorCode.DEADLINE:
            raise TaskTimeout(error or f"task {self.id} passed its deadline", final)
        raise TaskFailed(error or f"task {self.id} failed", final)

    async def stream(self) -> AsyncIterator[str]:
        async for item in self.events():
            if isinstance(item, str):
                yield item

    async def result(self) -> Answer:
        async for _ in self.events():
            pass
        final = self.final or {}
        raw = final.get(TaskField.USAGE)
        usage: dict[str, Any] = raw if isinstance(raw, dict) else {}
        return Answer(
            text=str(final.get(TaskField.RESPONSE) or ""),
            finish_reason=str(final.get(TaskField.FINISH_REASON) or "stop"),
            usage={k: int(v) for k, v in usage.items() if isinstance(v, (int, float))},
            task=final,
        )

    def abort(self) -> None:
        if self.final is None:
            self.client.abort(self.id)


def error_code(final: dict[str, Any]) -> ErrorCode | None:
    """The typed reason of a task that ended without an answer. A task from before the
    codes (or from another agent) has none: it is read as ``deadline`` if it ended after
    its own deadline, else as unclassified (None)."""
    raw = final.get(TaskField.ERROR_CODE)
    if isinstance(raw, str):
        try:
            return ErrorCode(raw)
        except ValueError:
            return None  # a code of a later version: unclassified here
    deadline, end = number(final, TaskField.DEADLINE), number(final, TaskField.END)
    if (
        final.get(TaskField.STATE) == State.FAILED.value
        and deadline is not None
        and (end is not None and end >= deadline)
    ):
        return ErrorCode.DEADLINE
    return None
