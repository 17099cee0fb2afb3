"""Response builders: a finished task as OpenAI's JSON answers (chat, text, embeddings)
and the pieces the stream reuses (usage, finish reason, choices)."""

from __future__ import annotations

import base64
import logging
import struct
from typing import Any

from fastapi.responses import JSONResponse

from ..client import Task
from ..protocol import FINISH_REASONS, TaskField
from ..summary import usage_counts
from .openai_models import ChatCompletion, Completion, EmbeddingList
from .state import Gateway
from .translate import Job

log = logging.getLogger("igora.gateway")


def usage_of(final: dict[str, Any]) -> dict[str, int]:
    """OpenAI's ``usage`` object of a finished task."""
    prompt, completion = usage_counts(final)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def extension(final: dict[str, Any]) -> dict[str, Any]:
    """The ``igora`` field of an answer: ``price``, the millicredits the asker's receipt
    signed for the run (what the market settles), in a room that counts credits."""
    price = final.get(TaskField.PRICE)
    return {"igora": {"price": price}} if isinstance(price, int) else {}


def finish_reason(final: dict[str, Any]) -> str:
    """OpenAI's finish reason of a finished task, or of one of its choices (same key)."""
    reason = final.get(TaskField.FINISH_REASON)
    return reason if reason in FINISH_REASONS else "stop"


def completion_response(
    gw: Gateway, task: Task, job: Job, created: int, headers: dict[str, str]
) -> JSONResponse:
    final = task.final or {}
    text = job.echo + str(final.get(TaskField.RESPONSE) or "")
    reason = finish_reason(final)
    usage = usage_of(final)
    model = gw.served_model(task, job.model)
    ident = job.prefix + task.id
    body: ChatCompletion | Completion
    if job.kind == "chat":
        body = ChatCompletion.model_validate(
            {
                "id": ident,
                "created": created,
                "model": model,
                "usage": usage,
                "choices": [_chat_choice(c) for c in choices_of(final)],
            }
        )
    else:
        body = Completion.model_validate(
            {
                "id": ident,
                "created": created,
                "model": model,
                "usage": usage,
                "choices": [{"index": 0, "text": text, "finish_reason": reason}],
            }
        )
    log.info("task %s: done (%s, %d tokens)", task.id, reason, usage["completion_tokens"])
    data = {**body.model_dump(), **extension(final)}
    for choice in data["choices"] if job.kind == "chat" else []:
        if choice["message"].get("tool_calls") is None:
            choice["message"].pop("tool_calls", None)
    return JSONResponse(data, headers=headers)


def choices_of(final: dict[str, Any]) -> list[dict[str, Any]]:
    """Every choice of a finished task, in the protocol's shape (docs/protocol.md 4.5)."""
    choices = final.get(TaskField.CHOICES)
    if isinstance(choices, list) and choices and all(isinstance(c, dict) for c in choices):
        return choices
    return [
        {
            "index": 0,
            "content": str(final.get(TaskField.RESPONSE) or ""),
            "toolCalls": final.get(TaskField.TOOL_CALLS),
            "finishReason": final.get(TaskField.FINISH_REASON),
            TaskField.LOGPROBS_RESULT: final.get(TaskField.LOGPROBS_RESULT),
        }
    ]


def _chat_choice(choice: dict[str, Any]) -> dict[str, Any]:
    calls = choice.get("toolCalls") if isinstance(choice.get("toolCalls"), list) else None
    logprobs = choice.get(TaskField.LOGPROBS_RESULT)
    message: dict[str, Any] = {"role": "assistant", "content": str(choice.get("content") or "")}
    if calls:  # as OpenAI: content null beside tool calls, no tool_calls key without
        message = {"role": "assistant", "content": message["content"] or None, "tool_calls": calls}
    return {
        "index": int(choice.get("index") or 0),
        "message": message,
        "finish_reason": finish_reason(choice),
        "logprobs": logprobs if isinstance(logprobs, dict) else None,
    }


def embedding_response(gw: Gateway, task: Task, job: Job, headers: dict[str, str]) -> JSONResponse:
    final = task.final or {}
    vectors = final.get(TaskField.EMBEDDINGS) or []
    usage = usage_of(final)
    as_base64 = job.encoding == "base64"
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": _base64(v) if as_base64 else [float(x) for x in v],
        }
        for i, v in enumerate(vectors)
    ]
    body = EmbeddingList.model_validate(
        {
            "data": data,
            "model": gw.served_model(task, job.model),
            "usage": {
                "prompt_tokens": usage["prompt_tokens"],
                "total_tokens": usage["prompt_tokens"],
            },
        }
    )
    log.info("task %s: %d embedding(s)", task.id, len(data))
    return JSONResponse(body.model_dump(), headers=headers)


def _base64(vector: list[float]) -> str:
    """OpenAI's ``encoding_format: "base64"``: little-endian float32 values."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
