"""What goes to and comes from an OpenAI-compatible upstream: the request body, the
stream's chunks, and the choices put together from them."""

from __future__ import annotations

import json
from typing import Any

from ..protocol import FINISH_REASONS, number
from .base import EngineError, Finish, Request


class Choices:
    """The choices of an upstream answer, put together from its chunks: content, tool
    calls (their ``arguments`` arrive in fragments), log probabilities, finish reason."""

    def __init__(self) -> None:
        self.content: dict[int, list[str]] = {}  # pieces, joined once at the end
        self.calls: dict[int, dict[int, dict[str, Any]]] = {}
        self.logprobs: dict[int, list[Any]] = {}
        self.reasons: dict[int, str] = {}

    def add(self, choice: dict[str, Any], whole: bool = False) -> str:
        """Take one chunk's choice; return its new content."""
        index = choice.get("index", 0)
        index = index if isinstance(index, int) else 0
        raw = choice.get("delta")
        delta: dict[str, Any] = raw if isinstance(raw, dict) else {}
        content = delta.get("content")
        content = content if isinstance(content, str) else ""
        self.content.setdefault(index, []).append(content)
        for j, call in enumerate(delta.get("tool_calls") or []):
            if not isinstance(call, dict):
                continue
            slot = call.get("index", j) if not whole else j
            mine = self.calls.setdefault(index, {}).setdefault(
                slot, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
            )
            if isinstance(call.get("id"), str):
                mine["id"] = call["id"]
            given = call.get("function")
            fn: dict[str, Any] = given if isinstance(given, dict) else {}
            if isinstance(fn.get("name"), str):
                mine["function"]["name"] += fn["name"]
            if isinstance(fn.get("arguments"), str):
                mine["function"]["arguments"] += fn["arguments"]
        lp = choice.get("logprobs")
        if isinstance(lp, dict) and isinstance(lp.get("content"), list):
            self.logprobs.setdefault(index, []).extend(lp["content"])
        if choice.get("finish_reason"):
            self.reasons[index] = str(choice["finish_reason"])
        return content

    def _calls(self, index: int) -> list[dict[str, Any]] | None:
        calls = self.calls.get(index)
        return [calls[k] for k in sorted(calls)] if calls else None

    def _logprobs(self, index: int) -> dict[str, Any] | None:
        return {"content": self.logprobs[index]} if index in self.logprobs else None

    def finish(self, first: Finish) -> Finish:
        indexes = sorted(set(self.content) | set(self.calls) | set(self.reasons)) or [0]
        choices = [
            {
                "index": i,
                "content": "".join(self.content.get(i, ())),
                "toolCalls": self._calls(i),
                "finishReason": self.reasons.get(i, "stop"),
                "tokenLogprobs": self._logprobs(i),
            }
            for i in indexes
        ]
        return Finish(
            first.reason,
            first.prompt_tokens,
            first.completion_tokens,
            tool_calls=self._calls(0),
            logprobs=self._logprobs(0),
            choices=choices if len(choices) > 1 else None,
        )


def request_body(model: str, request: Request, with_usage: bool) -> dict[str, Any]:
    """The JSON of a streamed ``POST /chat/completions`` for ``request``; ``with_usage``
    asks for the token counts (``stream_options``, which older servers refuse)."""
    body: dict[str, Any] = {
        "model": model,
        "messages": request.messages,
        "stream": True,
    }
    if with_usage:
        body["stream_options"] = {"include_usage": True}
    optional = {
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "seed": request.seed,
        "stop": request.stop or None,
        "tools": request.tools or None,
        "tool_choice": request.tool_choice,
        "response_format": request.response_format,
        "n": request.n if request.n > 1 else None,
        "logprobs": True if request.logprobs else None,
        "top_logprobs": request.top_logprobs if request.logprobs else None,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    return body


def parse_chunk(data: str, base_url: str) -> dict[str, Any]:
    """One chunk of the stream (or a whole answer) as a dict; EngineError if it is not one
    or if it carries an error."""
    try:
        chunk = json.loads(data)
    except ValueError:
        raise EngineError(
            f"the upstream {base_url} sent a malformed chunk: {data[:200]!r}"
        ) from None
    if not isinstance(chunk, dict):
        raise EngineError(f"the upstream {base_url} sent a malformed chunk: {data[:200]!r}")
    if chunk.get("error"):
        err = chunk["error"]
        message = err.get("message", err) if isinstance(err, dict) else err
        raise EngineError(f"the upstream {base_url} failed mid-answer: {message}")
    return chunk


def finish_of(reason: str | None, usage: dict[str, Any], pieces: int) -> Finish:
    """The end of an answer from its finish reason and usage (without usage, one piece
    counts as one token)."""

    def count(key: str) -> int | None:
        v = number(usage.get(key))
        return int(v) if v is not None else None

    completion = count("completion_tokens")
    return Finish(
        reason if reason in FINISH_REASONS else "stop",
        count("prompt_tokens") or 0,
        completion if completion is not None else pieces,  # no usage: one piece ~ a token
    )
