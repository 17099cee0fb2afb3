"""OpenAI's Responses API, answered from a chat task (docs/gateway.md, ``/v1/responses``):
the ``response`` object of a finished task, and the typed events of its stream."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse

from ..client import Restart, Task
from ..errors import IgoraError
from ..protocol import ProtocolError, TaskField
from .errors import from_igora
from .responses import choices_of, extension, usage_of
from .state import Gateway
from .streaming import ARGUMENT_PIECE, answer_items
from .translate import Job

log = logging.getLogger("igora.gateway")

INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}
"""Finish reasons that leave a response ``incomplete``, and the reason OpenAI gives."""


class Shape:
    """The parts of one task's response: ids, the request's settings, its items."""

    def __init__(self, gw: Gateway, task: Task, job: Job, created: int) -> None:
        self.job = job
        self.id = job.prefix + task.id
        self.message_id = "msg_" + task.id
        self.call_prefix = "fc_" + task.id
        self.created = created
        self.model = gw.served_model(task, job.model)

    def response(
        self,
        status: str,
        output: list[dict[str, Any]],
        final: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The ``response`` object; ``final`` (the finished task) gives its usage."""
        incomplete = None
        if status == "incomplete" and final is not None:
            incomplete = {"reason": INCOMPLETE.get(str(final.get(TaskField.FINISH_REASON)))}
        body: dict[str, Any] = {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": error,
            "incomplete_details": incomplete,
            "model": self.model,
            "output": output,
            **self.job.echoed,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "store": False,
            "truncation": "disabled",
            "usage": None if final is None else _usage(final),
        }
        return {**body, **extension(final)} if final is not None else body

    def message(self, text: str, status: str, logprobs: list[Any] | None) -> dict[str, Any]:
        return {
            "type": "message",
            "id": self.message_id,
            "status": status,
            "role": "assistant",
            "content": [self.part(text, logprobs)] if status == "completed" else [],
        }

    def part(self, text: str, logprobs: list[Any] | None) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}

    def call(self, i: int, call: dict[str, Any], status: str) -> dict[str, Any]:
        fn = call.get("function") or {}
        return {
            "type": "function_call",
            "id": f"{self.call_prefix}_{i}",
            "call_id": str(call.get("id") or f"call_{self.call_prefix}_{i}"),
            "name": str(fn.get("name") or ""),
            "arguments": str(fn.get("arguments") or "") if status == "completed" else "",
            "status": status,
        }

    def output(self, final: dict[str, Any]) -> list[dict[str, Any]]:
        """The items of a finished task: its text as a message, then its tool calls."""
        first = choices_of(final)[0]
        text = str(first.get("content") or "")
        calls = _calls(first)
        items = [self.message(text, "completed", _logprobs(first))] if text or not calls else []
        return items + [self.call(i, c, "completed") for i, c in enumerate(calls)]


def status_of(final: dict[str, Any]) -> str:
    return "incomplete" if final.get(TaskField.FINISH_REASON) in INCOMPLETE else "completed"


def response_json(
    gw: Gateway, task: Task, job: Job, created: int, headers: dict[str, str]
) -> JSONResponse:
    final = task.final or {}
    shape = Shape(gw, task, job, created)
    body = shape.response(status_of(final), shape.output(final), final)
    log.info("task %s: done (%s, %d tokens)", task.id, body["status"], _tokens(final))
    return JSONResponse(body, headers=headers)


async def response_events(
    gw: Gateway, task: Task, job: Job, first: Any, events: AsyncIterator[Any], created: int
) -> AsyncIterator[str]:
    """The event stream: pieces as ``response.output_text.delta`` events, the end as the
    items' closing events and ``response.completed`` (docs/gateway.md lists the order)."""
    shape = Shape(gw, task, job, created)
    out = Events()
    head = [
        out.event("response.created", response=shape.response("in_progress", [])),
        out.event("response.in_progress", response=shape.response("in_progress", [])),
    ]
    opened = False  # the message item, opened by the first text
    text = ""

    def open_message() -> list[str]:
        return [
            out.event(
                "response.output_item.added",
                output_index=0,
                item=shape.message("", "in_progress", None),
            ),
            out.event(
                "response.content_part.added",
                item_id=shape.message_id,
                output_index=0,
                content_index=0,
                part=shape.part("", None),
            ),
        ]

    def delta(piece: str, **extra: Any) -> str:
        return out.event(
            "response.output_text.delta",
            item_id=shape.message_id,
            output_index=0,
            content_index=0,
            delta=piece,
            logprobs=[],
            **extra,
        )

    final: dict[str, Any] | None = None  # the finished task
    pieces = answer_items(task, first, events)
    try:
        async for item in pieces:
            if isinstance(item, dict):
                final = item
            elif item:
                if not opened:
                    head += open_message()
                    opened = True
                extra = {"igora": {"restart": True}} if isinstance(item, Restart) else {}
                head.append(delta(item, **extra))
                text += item
            if head and final is None:
                yield "".join(head)
                head = []
    except (IgoraError, ProtocolError) as exc:
        err = from_igora(exc, job.requested)
        log.info("task %s: ended mid-stream with %d (%s)", task.id, err.status, exc)
        failed = shape.response("failed", [], error={"code": err.code, "message": err.message})
        yield "".join(head) + out.event("response.failed", response=failed)
        return
    finally:
        await pieces.aclose()
    final = final or {}
    choice = choices_of(final)[0]
    whole = str(choice.get("content") or "")
    calls = _calls(choice)
    tail = head
    if not opened and (whole or not calls):
        tail += open_message()
        opened = True
        if whole:
            tail.append(delta(whole))
            text = whole
    index = 0
    if opened:
        logprobs = _logprobs(choice)
        ids = {"item_id": shape.message_id, "output_index": 0, "content_index": 0}
        tail += [
            out.event("response.output_text.done", **ids, text=text, logprobs=logprobs or []),
            out.event("response.content_part.done", **ids, part=shape.part(text, logprobs)),
            out.event(
                "response.output_item.done",
                output_index=0,
                item=shape.message(text, "completed", logprobs),
            ),
        ]
        index = 1
    for i, call in enumerate(calls):
        done = shape.call(i, call, "completed")
        at = {"item_id": done["id"], "output_index": index + i}
        tail.append(
            out.event(
                "response.output_item.added",
                output_index=index + i,
                item=shape.call(i, call, "in_progress"),
            )
        )
        args = done["arguments"]
        tail += [
            out.event(
                "response.function_call_arguments.delta", **at, delta=args[k : k + ARGUMENT_PIECE]
            )
            for k in range(0, len(args), ARGUMENT_PIECE)
        ]
        tail += [
            out.event("response.function_call_arguments.done", **at, arguments=args),
            out.event("response.output_item.done", output_index=index + i, item=done),
        ]
    status = status_of(final)
    output = ([shape.message(text, "completed", _logprobs(choice))] if opened else []) + [
        shape.call(i, c, "completed") for i, c in enumerate(calls)
    ]
    tail.append(out.event(f"response.{status}", response=shape.response(status, output, final)))
    log.info("task %s: streamed (%s, %d tokens)", task.id, status, _tokens(final))
    yield "".join(tail)


class Events:
    """Numbers the events of one stream and writes each as ``event:`` and ``data:``."""

    def __init__(self) -> None:
        self.sequence = 0

    def event(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        return f"event: {kind}\ndata: {text}\n\n"


def _calls(choice: dict[str, Any]) -> list[dict[str, Any]]:
    calls = choice.get("toolCalls")
    return [c for c in calls if isinstance(c, dict)] if isinstance(calls, list) else []


def _logprobs(choice: dict[str, Any]) -> list[Any] | None:
    """Chat's ``logprobs.content`` list: the same entries OpenAI puts on an output_text."""
    result = choice.get(TaskField.LOGPROBS_RESULT)
    content = result.get("content") if isinstance(result, dict) else None
    return content if isinstance(content, list) else None


def _usage(final: dict[str, Any]) -> dict[str, Any]:
    usage = usage_of(final)
    return {
        "input_tokens": usage["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage["total_tokens"],
    }


def _tokens(final: dict[str, Any]) -> int:
    return usage_of(final)["completion_tokens"]
