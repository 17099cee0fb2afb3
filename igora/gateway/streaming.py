"""Streaming: Server-Sent Events that stop when the HTTP client goes, the chunks of an
answer as OpenAI streams them, and the body of a streamed answer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ..client import Restart, Task
from ..errors import IgoraError
from ..protocol import ProtocolError, TaskField
from .errors import OpenAIError, from_igora
from .responses import choices_of, extension, finish_reason, usage_of
from .state import Gateway
from .translate import Job

log = logging.getLogger("igora.gateway")

ARGUMENT_PIECE = 16  # characters of a tool call's arguments per streamed chunk

T = TypeVar("T")


class Gone:
    """The HTTP client disconnected."""


GONE = Gone()


async def _disconnected(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T | Gone:
    """Await ``work`` unless the HTTP client goes away first (then cancel it).

    ``work`` is awaited in the calling task, which the disconnect cancels: its result
    (the answer's first piece) wakes the request at once, not through a task of its own
    and ``asyncio.wait``'s callback (two more turns of the loop, in which the client's
    reader handles the rest of the answer first: docs/benchmarks.md, gateway latency)."""
    me = asyncio.current_task()
    assert me is not None
    left = False

    def cancel(watcher: asyncio.Future[None]) -> None:
        nonlocal left
        if not watcher.cancelled():
            left = True
            me.cancel()

    gone = asyncio.ensure_future(_disconnected(request.receive))
    gone.add_done_callback(cancel)
    try:
        return await work
    except asyncio.CancelledError:
        if not left:
            raise
        if sys.version_info >= (3, 11):
            me.uncancel()  # this cancellation ends here: none is left pending
        return GONE
    finally:  # before any other callback runs: ``cancel`` cannot fire any more
        gone.remove_done_callback(cancel)
        gone.cancel()


DONE = "data: [DONE]\n\n"


class EventStream(StreamingResponse):
    """Server-Sent Events that stop, and close their source, as soon as the client goes.

    Each piece the source yields is one write, sent at once; the source joins the events
    it has at one moment into one piece (the opening chunk with the first text, the
    finish, usage and ``[DONE]`` together), and the piece ending in ``[DONE]`` also ends
    the response (no separate empty write): fewer writes, fewer wake-ups of the client
    before it has its first token (docs/benchmarks.md, gateway latency)."""

    media_type = "text/event-stream"

    def __init__(
        self, content: AsyncIterator[str], headers: dict[str, str], on_gone: Callable[[], None]
    ) -> None:
        super().__init__(
            content, headers={"cache-control": "no-cache", "x-accel-buffering": "no", **headers}
        )
        self._source = content
        self._on_gone = on_gone
        self.finished = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            # The headers and the first piece go out now, not after a turn of the loop in
            # which the task group starts: the request waited for the first event, and
            # event_body yields its first piece without waiting.
            try:
                self.finished = await self._write_first(send)
            except OSError:
                return
            if self.finished:
                return
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                        self.finished = True
                    except OSError:
                        pass
                    group.cancel_scope.cancel()

                async def listen() -> None:
                    await _disconnected(receive)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                group.start_soon(listen)
        finally:
            if not self.finished:
                self._on_gone()
            aclose = getattr(self._source, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    async def _write_first(self, send: Send) -> bool:
        """The headers and the source's first piece; whether that ended the response."""
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        piece = await anext(self._source, None)  # None: stream_response ends it
        return piece is not None and await self._write(send, piece)

    async def _write(self, send: Send, piece: str) -> bool:
        """One piece; whether it ended the response (it ends in ``[DONE]``)."""
        last = piece.endswith(DONE)
        body = piece.encode("utf-8")
        await send({"type": "http.response.body", "body": body, "more_body": not last})
        return last

    async def stream_response(self, send: Send) -> None:
        """The source's pieces after the first (``_write_first``)."""
        async for piece in self._source:
            if await self._write(send, piece):
                return
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def sse(data: dict[str, Any] | str) -> str:
    text = (
        data
        if isinstance(data, str)
        else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    )
    return f"data: {text}\n\n"


class Chunks:
    """Builds the stream's chunk objects (chat or legacy text)."""

    def __init__(self, job: Job, ident: str, created: int, model: str) -> None:
        self.chat = job.kind == "chat"
        self.base: dict[str, Any] = {
            "id": ident,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": None,
        }
        if job.include_usage:
            self.base["usage"] = None

    def opening(self) -> dict[str, Any]:
        return self._make({"role": "assistant", "content": ""}, "", None)

    def text(self, text: str, **extra: Any) -> dict[str, Any]:
        return {**self._make({"content": text}, text, None), **extra}

    def finish(self, reason: str, index: int = 0) -> dict[str, Any]:
        return self._make({}, "", reason, index)

    def tool_calls(self, calls: list[dict[str, Any]], index: int = 0) -> Iterator[dict[str, Any]]:
        """A choice's tool calls as OpenAI streams them: for each call a first chunk with
        its index, id, type and function name (arguments ``""``), then the arguments in
        fragments."""
        for i, call in enumerate(calls):
            fn = call.get("function") or {}
            yield self._make(
                {
                    "tool_calls": [
                        {
                            "index": i,
                            "id": call.get("id"),
                            "type": "function",
                            "function": {"name": fn.get("name"), "arguments": ""},
                        }
                    ]
                },
                "",
                None,
                index,
            )
            args = str(fn.get("arguments") or "")
            for at in range(0, len(args), ARGUMENT_PIECE):
                yield self._make(
                    {
                        "tool_calls": [
                            {"index": i, "function": {"arguments": args[at : at + ARGUMENT_PIECE]}}
                        ]
                    },
                    "",
                    None,
                    index,
                )

    def choice(self, choice: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """A whole further choice (n > 1), sent after the first one's stream."""
        index = int(choice.get("index") or 0)
        yield self._make({"role": "assistant", "content": ""}, "", None, index)
        if choice.get("content"):
            chunk = self._make({"content": choice["content"]}, choice["content"], None, index)
            if isinstance(choice.get(TaskField.LOGPROBS_RESULT), dict):
                chunk["choices"][0]["logprobs"] = choice[TaskField.LOGPROBS_RESULT]
            yield chunk
        if isinstance(choice.get("toolCalls"), list):
            yield from self.tool_calls(choice["toolCalls"], index)
        yield self.finish(finish_reason(choice), index)

    def usage(self, usage: dict[str, int]) -> dict[str, Any]:
        return {**self.base, "choices": [], "usage": usage}

    def _make(
        self, delta: dict[str, Any], text: str, reason: str | None, index: int = 0
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index, "logprobs": None, "finish_reason": reason}
        if self.chat:
            choice["delta"] = delta
        else:
            choice["text"] = text
        return {**self.base, "choices": [choice]}


@dataclass
class AnswerStream:
    """The body of one streamed answer (a dataclass: its subclasses add what they
    need in ``__post_init__``). The loop is here: each text piece written as it
    comes (what ``opening`` gives goes with the first), the end in one write, and an
    error after the response started as an event of the API's own; what an API writes
    is in its subclass's hooks. A worker lost mid-answer restarts it elsewhere: the piece
    that says so is marked ``restart``, and what follows is the new answer."""

    gw: Gateway
    task: Task
    job: Job
    first: Any  # the task's first event: the request waited for it
    events: AsyncIterator[Any]
    created: int

    def opening(self) -> list[str]:
        """What goes before the first piece, in its write."""
        return []

    def piece(self, text: str, restart: bool) -> list[str]:
        raise NotImplementedError

    def failed(self, err: OpenAIError) -> str:
        """The event that ends a stream whose task failed after it started."""
        raise NotImplementedError

    def ending(self, final: dict[str, Any]) -> list[str]:
        """What the finished task adds after its pieces, and the stream's end."""
        raise NotImplementedError

    async def body(self) -> AsyncIterator[str]:
        head = self.opening()
        item = self.first
        try:
            while not isinstance(item, dict):  # a text piece: a Restart one marks a restart
                if item:
                    head += self.piece(item, isinstance(item, Restart))
                if head:
                    yield "".join(head)
                    head = []
                try:
                    item = await anext(self.events)
                except StopAsyncIteration:  # pragma: no cover - events end with the task
                    item = self.task.final or {}
        except (IgoraError, ProtocolError) as exc:
            err = from_igora(exc, self.job.requested)
            log.info("task %s: ended mid-stream with %d (%s)", self.task.id, err.status, exc)
            yield "".join(head) + self.failed(err)
            return
        finally:
            with contextlib.suppress(Exception):
                await self.events.aclose()  # type: ignore[attr-defined]
        yield "".join(head + self.ending(item))


@dataclass
class ChatStream(AnswerStream):
    """Chat and text completions as OpenAI streams them: ``data:`` chunks, then
    ``[DONE]``; an error after the start is ``data: {"error": {...}}`` (no [DONE])."""

    def __post_init__(self) -> None:
        model = self.gw.served_model(self.task, self.job.model)
        self.chunks = Chunks(self.job, self.job.prefix + self.task.id, self.created, model)

    def opening(self) -> list[str]:
        head = [sse(self.chunks.opening())] if self.chunks.chat else []
        return head + ([sse(self.chunks.text(self.job.echo))] if self.job.echo else [])

    def piece(self, text: str, restart: bool) -> list[str]:
        extra = {"igora": {"restart": True}} if restart else {}
        return [sse(self.chunks.text(text, **extra))]

    def failed(self, err: OpenAIError) -> str:
        return sse(err.body())

    def ending(self, final: dict[str, Any]) -> list[str]:
        chunks = self.chunks
        reason = finish_reason(final)
        choices = choices_of(final)
        first = choices[0]
        tail = []
        if chunks.chat and isinstance(first.get("toolCalls"), list):
            tail += [sse(chunk) for chunk in chunks.tool_calls(first["toolCalls"])]
        if chunks.chat and isinstance(first.get(TaskField.LOGPROBS_RESULT), dict):
            # Log probabilities come with the whole answer: one chunk, without content.
            chunk = chunks.text("")
            chunk["choices"][0]["logprobs"] = first[TaskField.LOGPROBS_RESULT]
            chunk["choices"][0]["delta"] = {}
            tail.append(sse(chunk))
        tail.append(sse(chunks.finish(reason)))
        for choice in choices[1:]:
            tail += [sse(chunk) for chunk in chunks.choice(choice)]
        usage = usage_of(final)
        if self.job.include_usage:
            tail.append(sse({**chunks.usage(usage), **extension(final)}))
        log.info(
            "task %s: streamed (%s, %d tokens)", self.task.id, reason, usage["completion_tokens"]
        )
        return [*tail, DONE]
