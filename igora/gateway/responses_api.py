"""OpenAI's Responses API, answered from a chat task (docs/gateway.md, ``/v1/responses``):
the ``response`` object of a finished task, and the typed events of its stream."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse

from ..client import Task
from ..protocol import TaskField
from .errors import OpenAIError
from .responses import choices_of, extension, usage_of
from .state import Gateway
from .streaming import ARGUMENT_PIECE, AnswerStream
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

    def call(self, i: int, call: dict[str, Any]) -> dict[str, Any]:
        fn = call.get("function") or {}
        return {
            "type": "function_call",
            "id": f"{self.call_prefix}_{i}",
            "call_id": str(call.get("id") or f"call_{self.call_prefix}_{i}"),
            "name": str(fn.get("name") or ""),
            "arguments": str(fn.get("arguments") or ""),
            "status": "completed",
        }

    def output(self, final: dict[str, Any], streamed: str | None = None) -> list[dict[str, Any]]:
        """The items of a finished task: its text as a message (``streamed``: the text a
        stream's message item gave, which a restart notice may precede), then its calls."""
        first = choices_of(final)[0]
        text = str(first.get("content") or "") if streamed is None else streamed
        calls = _calls(first)
        message = streamed is not None or text or not calls
        items = [self.message(text, "completed", _logprobs(first))] if message else []
        return items + [self.call(i, c) for i, c in enumerate(calls)]


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


@dataclass
class ResponsesStream(AnswerStream):
    """The Responses API's events (docs/gateway.md lists their order): pieces as
    ``response.output_text.delta`` of a message item opened by the first text, the end as
    the items' closing events and ``response.completed`` (or ``response.incomplete``), an
    error after the start as ``response.failed``."""

    def __post_init__(self) -> None:
        self.shape = Shape(self.gw, self.task, self.job, self.created)
        self.out = Events()
        self.opened = False  # the message item, opened by the first text
        self.pieces: list[str] = []  # its text (joined once, at the end)
        self.at = {"item_id": self.shape.message_id, "output_index": 0, "content_index": 0}

    def opening(self) -> list[str]:
        started = self.shape.response("in_progress", [])
        return [
            self.out.event("response.created", response=started),
            self.out.event("response.in_progress", response=started),
        ]

    def piece(self, text: str, restart: bool) -> list[str]:
        extra = {"igora": {"restart": True}} if restart else {}
        self.pieces.append(text)
        opening = self._open()  # numbered before the delta
        delta = self.out.event(
            "response.output_text.delta", **self.at, delta=text, logprobs=[], **extra
        )
        return [*opening, delta]

    def failed(self, err: OpenAIError) -> str:
        error = {"code": err.code, "message": err.message}
        return self.out.event(
            "response.failed", response=self.shape.response("failed", [], error=error)
        )

    def ending(self, final: dict[str, Any]) -> list[str]:
        choice = choices_of(final)[0]
        whole = str(choice.get("content") or "")
        tail: list[str] = []
        if not self.opened and (whole or not _calls(choice)):  # an answer that came whole
            tail += self.piece(whole, False) if whole else self._open()
        output = self.shape.output(final, "".join(self.pieces) if self.opened else None)
        for index, item in enumerate(output):
            tail += self._closing(index, item)
        status = status_of(final)
        response = self.shape.response(status, output, final)
        tail.append(self.out.event(f"response.{status}", response=response))
        log.info("task %s: streamed (%s, %d tokens)", self.task.id, status, _tokens(final))
        return tail

    def _closing(self, index: int, item: dict[str, Any]) -> list[str]:
        """The events that end an output item: the message opened by the text, or a
        function call sent whole (added, its arguments in fragments, done)."""
        event = self.out.event
        if item["type"] == "message":
            part = item["content"][0]
            return [
                event(
                    "response.output_text.done",
                    **self.at,
                    text=part["text"],
                    logprobs=part["logprobs"],
                ),
                event("response.content_part.done", **self.at, part=part),
                event("response.output_item.done", output_index=index, item=item),
            ]
        at = {"item_id": item["id"], "output_index": index}
        args = item["arguments"]
        started = {**item, "arguments": "", "status": "in_progress"}
        return [
            event("response.output_item.added", output_index=index, item=started),
            *(
                event(
                    "response.function_call_arguments.delta",
                    **at,
                    delta=args[k : k + ARGUMENT_PIECE],
                )
                for k in range(0, len(args), ARGUMENT_PIECE)
            ),
            event("response.function_call_arguments.done", **at, arguments=args),
            event("response.output_item.done", output_index=index, item=item),
        ]

    def _open(self) -> list[str]:
        """The message item's opening events, the first time."""
        if self.opened:
            return []
        self.opened = True
        return [
            self.out.event(
                "response.output_item.added",
                output_index=0,
                item=self.shape.message("", "in_progress", None),
            ),
            self.out.event(
                "response.content_part.added", **self.at, part=self.shape.part("", None)
            ),
        ]


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
