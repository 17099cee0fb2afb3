"""The OpenAI-compatible gateway: an HTTP front for the market.

``create_app(...)`` builds a FastAPI application holding one market ``Client`` (named
``openai-gateway``, awareness style ``openai_compatible_endpoint`` as in the original)
for its whole life, in ``app.state.client``. Each API request becomes one task on the
market; the answer is streamed back as it arrives (Server-Sent Events) or returned as
soon as the task is done. A client that goes away aborts its task.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``,
``POST /v1/embeddings``, ``GET /v1/models``,
``GET /v1/models/{id}``, ``GET /health``, ``GET /openapi.json`` (and ``/docs``). The web
page's routes (``igora.web.routes``) are included when present.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..capabilities import offered
from ..client import DEFAULT_TIMEOUT, Client, Restart, Task
from ..errors import IgoraError
from ..protocol import GATEWAY_STYLE, A, F, MapName, ProtocolError, TaskKind
from . import errors
from .errors import OpenAIError, from_igora
from .openai_models import (
    GENERIC_MODELS,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    EmbeddingList,
    EmbeddingRequest,
    ErrorBody,
    Health,
    Model,
    ModelList,
)

from .defaults import DEFAULT_HOST, DEFAULT_PORT, GATEWAY_NAME

log = logging.getLogger("igora.gateway")

MAX_BODY = 8 * 1024 * 1024
STARTUP_GRACE = 2.0
"""Seconds after connecting during which a request waits for workers' awareness to
arrive before concluding that no worker serves its model."""
STARTUP_SYNC_WAIT = 3.0
"""Seconds the start-up waits for the market before serving anyway (answering 503)."""
TASK_HEADER = "x-igora-task"
FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "content_filter"})
ARGUMENT_PIECE = 16  # characters of a tool call's arguments per streamed chunk

T = TypeVar("T")
ClientFactory = Callable[[], Client]


# ---------------------------------------------------------------------- settings
@dataclass
class Gateway:
    """What the routes share: the market client and the gateway's settings."""

    client: Client
    api_keys: tuple[str, ...] = ()
    wait_worker: float = 0.0
    timeout: float = DEFAULT_TIMEOUT
    started: float = field(default_factory=time.time)

    @property
    def connected(self) -> bool:
        agent = self.client.agent
        return agent.connected and agent.synced.is_set()

    def worker_wait(self) -> float:
        """How long a request may wait for a fitting worker to show up."""
        since = time.monotonic() - self.client.agent.connected_at
        return max(self.wait_worker, STARTUP_GRACE - since, 0.0)

    def served_model(self, task: Task, requested: str | None) -> str:
        """The model that answers: the one asked for, else the first of its worker's."""
        if requested:
            return requested
        worker_id = (task.final or {}).get(F.WORKER)
        if worker_id is None:
            doing = self.client.agent.maps[MapName.DOING].get(task.id)
            worker_id = doing.get(F.WORKER) if isinstance(doing, dict) else None
        for peer in self.client.workers():
            if peer.id == worker_id and peer.models:
                return peer.models[0]
        return "igora"


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway  # type: ignore[no-any-return]


def market_model(name: str | None) -> str | None:
    """The market model a request's ``model`` names (None: any worker)."""
    if name is None or name.strip().lower() in GENERIC_MODELS:
        return None
    return name


# ---------------------------------------------------------------------- ASGI middleware
class GuardMiddleware:
    """API-key check on ``/v1/*`` and a limit on the request body, before any parsing,
    so a wrong key is always a 401 and a huge body a 413; POST bodies are read as JSON
    whatever their declared type."""

    def __init__(self, app: ASGIApp, api_keys: Iterable[str], max_body: int = MAX_BODY) -> None:
        self.app = app
        self.keys = tuple(k for k in api_keys if k)
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        path: str = scope.get("path", "")
        if self.keys and path.startswith("/v1") and scope.get("method") != "OPTIONS":
            error = self._auth_error(headers.get("authorization"))
            if error is not None:
                await error.response()(scope, receive, send)
                return
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            err = OpenAIError(413, f"The request body is larger than {self.max_body} bytes.",
                              code="request_too_large")
            await err.response()(scope, receive, send)
            return
        if scope.get("method") == "POST" and "json" not in headers.get("content-type", ""):
            # Read every POST body as JSON, as OpenAI does (curl -d sends a form type).
            scope = dict(scope)
            scope["headers"] = [(k, v) for k, v in scope.get("headers", [])
                                if k.lower() != b"content-type"]
            scope["headers"].append((b"content-type", b"application/json"))
        await self.app(scope, self._limited(receive), send)

    def _limited(self, receive: Receive) -> Receive:
        """A body sent without Content-Length (chunked) is cut at the same limit."""
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise HTTPException(413, "request body too large")
            return message

        return limited

    def _auth_error(self, header: str | None) -> OpenAIError | None:
        if not header:
            return OpenAIError(401, "You didn't provide an API key: send it in the "
                                    "'Authorization: Bearer KEY' header.",
                               code="invalid_api_key")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() == "bearer" and any(
                hmac.compare_digest(token.encode(), k.encode()) for k in self.keys):
            return None
        return OpenAIError(401, "Incorrect API key provided.", code="invalid_api_key")


# ---------------------------------------------------------------------- disconnects
class _Gone:
    """The HTTP client disconnected."""


GONE = _Gone()


async def _disconnected(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T | _Gone:
    """Await ``work`` unless the HTTP client goes away first (then cancel it)."""
    job = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({job, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not job.done():
            job.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await job
    return job.result() if not job.cancelled() else GONE


class EventStream(StreamingResponse):
    """Server-Sent Events that stop, and close their source, as soon as the client goes."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], headers: dict[str, str],
                 on_gone: Callable[[], None]) -> None:
        super().__init__(content, headers={"cache-control": "no-cache",
                                           "x-accel-buffering": "no", **headers})
        self._source = content
        self._on_gone = on_gone
        self.finished = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
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


def sse(data: dict[str, Any] | str) -> str:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False,
                                                         separators=(",", ":"))
    return f"data: {text}\n\n"


# ---------------------------------------------------------------------- one request
@dataclass
class Job:
    """One API request, translated for the market."""

    kind: str  # "chat", "text" or "embed"
    prompt: str | list[dict[str, Any]] | None
    requested: str | None
    options: dict[str, Any]
    stream: bool
    include_usage: bool
    user: str | None
    echo: str = ""
    encoding: str | None = None  # embeddings: "float" or "base64"

    @property
    def model(self) -> str | None:
        return market_model(self.requested)

    @property
    def prefix(self) -> str:
        return "chatcmpl-" if self.kind == "chat" else "cmpl-"


def _common_options(body: ChatCompletionRequest | CompletionRequest,
                    max_tokens: int | None) -> dict[str, Any]:
    if body.stream_options is not None and not body.stream:
        raise OpenAIError(400, "stream_options is only allowed when stream is true.",
                          param="stream_options", code="invalid_value")
    return {"temperature": body.temperature, "top_p": body.top_p, "seed": body.seed,
            "max_tokens": max_tokens, "stop": body.stop}


def _unsupported(param: str, what: str) -> OpenAIError:
    return OpenAIError(400, f"{param} is not supported: {what}.", param=param,
                       code="unsupported_parameter")


def _chat_options(body: ChatCompletionRequest) -> dict[str, Any]:
    """Tools, response format, choices and log probabilities, in the task's shapes (OpenAI's
    own objects; docs/protocol.md 4.5)."""
    if body.functions:
        raise _unsupported("functions", "the legacy functions API is replaced by tools")
    if body.top_logprobs and not body.logprobs:
        raise OpenAIError(400, "top_logprobs needs logprobs: true.", param="top_logprobs",
                          code="invalid_value")
    if body.tool_choice is not None and not body.tools and body.tool_choice != "none":
        raise OpenAIError(400, "tool_choice needs tools.", param="tool_choice",
                          code="invalid_value")
    options: dict[str, Any] = {}
    if body.tools:
        options["tools"] = [t.model_dump(exclude_none=True) for t in body.tools]
        if body.tool_choice is not None:
            choice = body.tool_choice
            options["tool_choice"] = choice if isinstance(choice, str) else choice.model_dump()
            if not isinstance(choice, str) and choice.function.name not in {
                    t.function.name for t in body.tools}:
                raise OpenAIError(400, f"tool_choice names {choice.function.name!r}, which is "
                                       f"not in tools.", param="tool_choice",
                                  code="invalid_value")
    fmt = body.response_format
    if fmt is not None and fmt.type != "text":
        out: dict[str, Any] = {"type": fmt.type}
        if fmt.type == "json_schema":
            if fmt.json_schema is None:
                raise OpenAIError(400, "response_format of type json_schema needs json_schema.",
                                  param="response_format.json_schema",
                                  code="missing_required_parameter")
            spec = fmt.json_schema.model_dump(by_alias=True, exclude_none=True)
            spec.setdefault("schema", {"type": "object"})
            out["json_schema"] = spec
        options["response_format"] = out
    if body.n is not None and body.n > 1:
        options["n"] = body.n
    if body.logprobs:
        options["logprobs"] = True
        if body.top_logprobs:
            options["top_logprobs"] = body.top_logprobs
    return options


def chat_job(body: ChatCompletionRequest) -> Job:
    messages: list[dict[str, Any]] = []
    for i, m in enumerate(body.messages):
        if isinstance(m.content, list):
            parts = []
            for j, part in enumerate(m.content):
                if part.type != "text" or part.text is None:
                    raise OpenAIError(400, f"messages[{i}].content[{j}]: only text parts are "
                                           f"supported (got type {part.type!r}).",
                                      param=f"messages[{i}].content[{j}]",
                                      code="unsupported_value")
                parts.append(part.text)
            content = "\n".join(parts)
        else:
            content = m.content or ""
        role = "system" if m.role == "developer" else m.role
        message: dict[str, Any] = {"role": role, "content": content}
        if m.tool_calls:
            message["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_call_id:
            message["tool_call_id"] = m.tool_call_id
        if m.name and role in ("tool", "function"):
            message["name"] = m.name
        messages.append(message)
    max_tokens = body.max_completion_tokens or body.max_tokens
    stream_usage = bool(body.stream_options and body.stream_options.include_usage)
    options = {**_common_options(body, max_tokens), **_chat_options(body)}
    return Job("chat", messages, body.model, options, bool(body.stream), stream_usage,
               body.user)


def text_job(body: CompletionRequest) -> Job:
    if body.n is not None and body.n > 1:
        raise _unsupported("n", "legacy completions answer with one choice (use "
                                "/v1/chat/completions for several)")
    if body.best_of is not None and body.best_of > 1:
        raise _unsupported("best_of", "Igora answers with one choice per request")
    if body.logprobs:
        raise _unsupported("logprobs", "workers do not report token probabilities")
    if body.suffix:
        raise _unsupported("suffix", "workers complete at the end of the prompt only")
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise OpenAIError(400, "prompt must be a string or a list of exactly one string "
                                   "(send one request per prompt).", param="prompt",
                              code="unsupported_value")
        prompt = prompt[0]
    stream_usage = bool(body.stream_options and body.stream_options.include_usage)
    return Job("text", prompt, body.model, _common_options(body, body.max_tokens),
               bool(body.stream), stream_usage, body.user, echo=prompt if body.echo else "")


def _usage(final: dict[str, Any]) -> dict[str, int]:
    raw = final.get(F.USAGE) if isinstance(final.get(F.USAGE), dict) else {}
    prompt = raw.get(F.PROMPT_TOKENS, 0)
    completion = raw.get(F.COMPLETION_TOKENS, 0)
    prompt = int(prompt) if isinstance(prompt, (int, float)) else 0
    completion = int(completion) if isinstance(completion, (int, float)) else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _finish_reason(final: dict[str, Any]) -> str:
    reason = final.get(F.FINISH_REASON)
    return reason if reason in FINISH_REASONS else "stop"


async def run_job(request: Request, job: Job) -> Response:
    """Put the job on the market and answer: JSON, or an event stream."""
    gw = _gateway(request)
    if not gw.connected:
        raise OpenAIError(503, f"The gateway is not connected to the market "
                               f"{gw.client.address.room_url}; retry in a moment.",
                          type=errors.SERVER, code="market_unreachable")
    try:
        task = await gw.client.submit(job.prompt, model=job.model, timeout=gw.timeout,  # type: ignore[arg-type]
                                      wait_worker=gw.worker_wait(), **job.options)
    except (IgoraError, ProtocolError) as exc:
        raise from_igora(exc, job.requested) from None
    headers = {TASK_HEADER: task.id}
    log.info("task %s: %s request for model %s%s%s", task.id, job.kind,
             job.model or "any", " (stream)" if job.stream else "",
             f" from user {job.user!r}" if job.user else "")
    events = task.events()
    created = int(time.time())
    try:
        if not job.stream:
            outcome = await unless_disconnected(request, _drain(events))
        else:
            outcome = await unless_disconnected(request, anext(events))
    except (IgoraError, ProtocolError) as exc:
        err = from_igora(exc, job.requested)
        log.info("task %s: answered %d (%s)", task.id, err.status, exc)
        return err.response(headers)
    if isinstance(outcome, _Gone):
        log.info("task %s: the HTTP client went away; task aborted", task.id)
        task.abort()
        return Response(status_code=499)
    if job.kind == "embed":
        return _embedded(gw, task, job, headers)
    if not job.stream:
        return _complete(gw, task, job, created, headers)
    return EventStream(_stream(gw, task, job, outcome, events, created), headers,
                       on_gone=lambda: _gone(task))


def _gone(task: Task) -> None:
    if task.final is None:
        log.info("task %s: the HTTP client disconnected mid-stream; task aborted", task.id)
        task.abort()


async def _drain(events: AsyncIterator[Any]) -> None:
    async for _ in events:
        pass


def _complete(gw: Gateway, task: Task, job: Job, created: int,
              headers: dict[str, str]) -> JSONResponse:
    final = task.final or {}
    text = job.echo + str(final.get(F.RESPONSE) or "")
    reason = _finish_reason(final)
    usage = _usage(final)
    model = gw.served_model(task, job.model)
    ident = job.prefix + task.id
    body: ChatCompletion | Completion
    if job.kind == "chat":
        body = ChatCompletion.model_validate({
            "id": ident, "created": created, "model": model, "usage": usage,
            "choices": [_chat_choice(c) for c in _choices(final)]})
    else:
        body = Completion.model_validate({
            "id": ident, "created": created, "model": model, "usage": usage,
            "choices": [{"index": 0, "text": text, "finish_reason": reason}]})
    log.info("task %s: done (%s, %d tokens)", task.id, reason, usage["completion_tokens"])
    data = body.model_dump()
    for choice in data["choices"] if job.kind == "chat" else []:
        if choice["message"].get("tool_calls") is None:
            choice["message"].pop("tool_calls", None)
    return JSONResponse(data, headers=headers)


def _choices(final: dict[str, Any]) -> list[dict[str, Any]]:
    """Every choice of a finished task, in the protocol's shape (docs/protocol.md 4.5)."""
    choices = final.get(F.CHOICES)
    if isinstance(choices, list) and choices and all(isinstance(c, dict) for c in choices):
        return choices
    return [{"index": 0, "content": str(final.get(F.RESPONSE) or ""),
             "toolCalls": final.get(F.TOOL_CALLS), "finishReason": final.get(F.FINISH_REASON),
             F.LOGPROBS_RESULT: final.get(F.LOGPROBS_RESULT)}]


def _chat_choice(choice: dict[str, Any]) -> dict[str, Any]:
    calls = choice.get("toolCalls") if isinstance(choice.get("toolCalls"), list) else None
    reason = choice.get("finishReason")
    logprobs = choice.get(F.LOGPROBS_RESULT)
    message: dict[str, Any] = {"role": "assistant", "content": str(choice.get("content") or "")}
    if calls:  # as OpenAI: content null beside tool calls, no tool_calls key without
        message = {"role": "assistant", "content": message["content"] or None,
                   "tool_calls": calls}
    return {"index": int(choice.get("index") or 0), "message": message,
            "finish_reason": reason if reason in FINISH_REASONS else "stop",
            "logprobs": logprobs if isinstance(logprobs, dict) else None}


def _embedded(gw: Gateway, task: Task, job: Job, headers: dict[str, str]) -> JSONResponse:
    final = task.final or {}
    vectors = final.get(F.EMBEDDINGS) or []
    usage = _usage(final)
    as_base64 = job.encoding == "base64"
    data = [{"object": "embedding", "index": i,
             "embedding": _base64(v) if as_base64 else [float(x) for x in v]}
            for i, v in enumerate(vectors)]
    body = EmbeddingList.model_validate({
        "data": data, "model": gw.served_model(task, job.model),
        "usage": {"prompt_tokens": usage["prompt_tokens"], "total_tokens": usage["prompt_tokens"]}})
    log.info("task %s: %d embedding(s)", task.id, len(data))
    return JSONResponse(body.model_dump(), headers=headers)


def _base64(vector: list[float]) -> str:
    """OpenAI's ``encoding_format: "base64"``: little-endian float32 values."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def embed_job(body: EmbeddingRequest) -> Job:
    texts = body.input if isinstance(body.input, list) else [body.input]
    options = {"_extra": {F.KIND: TaskKind.EMBED.value, F.INPUTS: texts,
                          F.DIMENSIONS: body.dimensions},
               "_pieces": False}
    return Job("embed", None, body.model, options, False, False, body.user,
               encoding=body.encoding_format)


class Chunks:
    """Builds the stream's chunk objects (chat or legacy text)."""

    def __init__(self, job: Job, ident: str, created: int, model: str) -> None:
        self.chat = job.kind == "chat"
        self.base: dict[str, Any] = {
            "id": ident, "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": created, "model": model, "system_fingerprint": None}
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
            yield self._make({"tool_calls": [{"index": i, "id": call.get("id"), "type": "function",
                                              "function": {"name": fn.get("name"),
                                                           "arguments": ""}}]}, "", None, index)
            args = str(fn.get("arguments") or "")
            for at in range(0, len(args), ARGUMENT_PIECE):
                yield self._make({"tool_calls": [{"index": i, "function": {
                    "arguments": args[at:at + ARGUMENT_PIECE]}}]}, "", None, index)

    def choice(self, choice: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """A whole further choice (n > 1), sent after the first one's stream."""
        index = int(choice.get("index") or 0)
        yield self._make({"role": "assistant", "content": ""}, "", None, index)
        if choice.get("content"):
            chunk = self._make({"content": choice["content"]}, choice["content"], None, index)
            if isinstance(choice.get(F.LOGPROBS_RESULT), dict):
                chunk["choices"][0]["logprobs"] = choice[F.LOGPROBS_RESULT]
            yield chunk
        if isinstance(choice.get("toolCalls"), list):
            yield from self.tool_calls(choice["toolCalls"], index)
        reason = choice.get("finishReason")
        yield self.finish(reason if reason in FINISH_REASONS else "stop", index)

    def usage(self, usage: dict[str, int]) -> dict[str, Any]:
        return {**self.base, "choices": [], "usage": usage}

    def _make(self, delta: dict[str, Any], text: str, reason: str | None,
              index: int = 0) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index, "logprobs": None, "finish_reason": reason}
        if self.chat:
            choice["delta"] = delta
        else:
            choice["text"] = text
        return {**self.base, "choices": [choice]}


async def _stream(gw: Gateway, task: Task, job: Job, first: Any,
                  events: AsyncIterator[Any], created: int) -> AsyncIterator[str]:
    """The SSE body. A worker lost mid-answer restarts it elsewhere: its chunk carries
    the notice text and ``"igora": {"restart": true}``; what follows is the new answer.
    An error after the stream started is sent as ``data: {"error": {...}}`` (no [DONE])."""
    chunks = Chunks(job, job.prefix + task.id, created, gw.served_model(task, job.model))
    try:
        if chunks.chat:
            yield sse(chunks.opening())
        if job.echo:
            yield sse(chunks.text(job.echo))
        item = first
        while not isinstance(item, dict):
            if isinstance(item, Restart):
                yield sse(chunks.text(str(item), igora={"restart": True}))
            elif item:
                yield sse(chunks.text(item))
            try:
                item = await anext(events)
            except StopAsyncIteration:  # pragma: no cover - events end with the final task
                item = task.final or {}
            except (IgoraError, ProtocolError) as exc:
                err = from_igora(exc, job.requested)
                log.info("task %s: ended mid-stream with %d (%s)", task.id, err.status, exc)
                yield sse(err.body())
                return
        reason = _finish_reason(item)
        choices = _choices(item)
        first = choices[0]
        if chunks.chat and isinstance(first.get("toolCalls"), list):
            for chunk in chunks.tool_calls(first["toolCalls"]):
                yield sse(chunk)
        if chunks.chat and isinstance(first.get(F.LOGPROBS_RESULT), dict):
            # Log probabilities come with the whole answer: one chunk, without content.
            chunk = chunks.text("")
            chunk["choices"][0]["logprobs"] = first[F.LOGPROBS_RESULT]
            chunk["choices"][0]["delta"] = {}
            yield sse(chunk)
        yield sse(chunks.finish(reason))
        for choice in choices[1:]:
            for chunk in chunks.choice(choice):
                yield sse(chunk)
        usage = _usage(item)
        if job.include_usage:
            yield sse(chunks.usage(usage))
        log.info("task %s: streamed (%s, %d tokens)", task.id, reason,
                 usage["completion_tokens"])
        yield sse("[DONE]")
    finally:
        with contextlib.suppress(Exception):
            await events.aclose()  # type: ignore[attr-defined]


# ---------------------------------------------------------------------- routes
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": what} for code, what in {
        400: "Malformed or invalid parameters", 401: "Wrong or missing API key",
        404: "Unknown model", 413: "Request body too large",
        502: "The worker failed or the task was aborted",
        503: "No worker on the market, or market unreachable",
        504: "The task timed out"}.items()}
STREAM_DOC = {"text/event-stream": {"schema": {"type": "string"},
                                    "example": 'data: {"object": "chat.completion.chunk", ...}'
                                               '\n\ndata: [DONE]\n\n'}}


def _add_routes(app: FastAPI) -> None:
    @app.get("/health", response_model=Health, tags=["gateway"],
             responses={503: {"model": Health, "description": "Not connected to the market"}})
    async def health(request: Request) -> JSONResponse:
        """200 when the gateway is connected to the market, else 503."""
        gw = _gateway(request)
        connected = gw.connected
        body = Health(status="ok" if connected else "connecting",
                      market=gw.client.address.room_url, connected=connected,
                      workers=len(gw.client.workers()) if connected else 0,
                      models=gw.client.models() if connected else [])
        return JSONResponse(body.model_dump(), status_code=200 if connected else 503)

    @app.get("/v1/models", response_model=ModelList, tags=["openai"],
             responses={401: ERRORS[401]})
    async def list_models(request: Request) -> JSONResponse:
        """Models that workers on the market serve right now."""
        return JSONResponse(ModelList(data=_models(_gateway(request))).model_dump())

    @app.get("/v1/models/{model_id:path}", response_model=Model, tags=["openai"],
             responses={401: ERRORS[401], 404: ERRORS[404]})
    async def get_model(model_id: str, request: Request) -> JSONResponse:
        """One model served on the market now."""
        for m in _models(_gateway(request)):
            if m.id == model_id:
                return JSONResponse(m.model_dump())
        raise OpenAIError(404, f"The model {model_id!r} is not served on the market right now.",
                          param="model", code="model_not_found")

    @app.post("/v1/chat/completions", response_model=ChatCompletion, tags=["openai"],
              responses={200: {"content": STREAM_DOC}, **ERRORS})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        """A chat answer from a worker on the market (``stream: true`` for SSE chunks)."""
        return await run_job(request, chat_job(body))

    @app.post("/v1/embeddings", response_model=EmbeddingList, tags=["openai"],
              responses=ERRORS)
    async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
        """Vectors for one text or a list of texts, from a worker whose model embeds."""
        return await run_job(request, embed_job(body))

    @app.post("/v1/completions", response_model=Completion, tags=["openai"],
              responses={200: {"content": STREAM_DOC}, **ERRORS})
    async def completions(body: CompletionRequest, request: Request) -> Response:
        """Legacy text completion: the prompt is sent to a worker as one user message."""
        return await run_job(request, text_job(body))


def _models(gw: Gateway) -> list[Model]:
    """The models served now, each with what at least one of its workers offers on it
    (the extra field ``capabilities``)."""
    first_seen: dict[str, float] = {}
    caps: dict[str, set[str]] = {}
    for peer in gw.client.workers():
        since = peer.state.get(A.SINCE)
        since = since / 1000 if isinstance(since, (int, float)) else gw.started
        for name in peer.models:
            first_seen[name] = min(first_seen.get(name, since), since)
            caps.setdefault(name, set()).update(offered(peer, name))
    return [Model(id=name, created=int(first_seen[name]), owned_by="igora-market",
                  capabilities=sorted(caps[name]))
            for name in sorted(first_seen)]


# ---------------------------------------------------------------------- factory
def create_app(
    market: str | None = None,
    room: str | None = None,
    *,
    client_factory: ClientFactory | None = None,
    api_keys: Iterable[str] = (),
    cors_origins: Iterable[str] = ("*",),
    timeout: float = DEFAULT_TIMEOUT,
    wait_worker: float = 0.0,
    heartbeat: float | None = None,
    name: str = GATEWAY_NAME,
) -> FastAPI:
    """The gateway application.

    ``client_factory`` returns a new, not yet connected ``Client`` (default: one on
    ``market``/``room``, resolved as every Igora command does); the app connects it at
    start-up and closes it at shutdown. ``api_keys``: if any, ``/v1/*`` needs
    ``Authorization: Bearer KEY``. ``timeout``: deadline of each task in seconds.
    ``wait_worker``: seconds a request waits for a worker serving its model to appear.
    """
    keys = tuple(k for k in api_keys if k)

    def default_client() -> Client:
        return Client(market, room, name=name, style=GATEWAY_STYLE, timeout=timeout)

    factory = client_factory or default_client

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = factory()
        if heartbeat:
            client.agent.heartbeat = heartbeat
            client.agent.set_state(**{A.HEARTBEAT: heartbeat})
        app.state.client = client
        app.state.gateway = Gateway(client, keys, wait_worker, timeout)
        await client.agent.start(wait=False)
        try:
            await asyncio.wait_for(client.agent.synced.wait(), STARTUP_SYNC_WAIT)
            log.info("%s connected to %s", client.agent.name, client.address.room_url)
        except asyncio.TimeoutError:
            log.warning("%s: market %s not reachable yet; /health answers 503 and requests "
                        "fail with 503 until it is", client.agent.name, client.address.room_url)
        try:
            yield
        finally:
            await client.close()

    app = FastAPI(title="Igora OpenAI-compatible gateway", lifespan=lifespan,
                  description="An OpenAI-compatible API in front of an Igora market: each "
                              "request is a task answered by a worker. See docs/gateway.md.")
    errors.install(app)
    _add_routes(app)
    try:
        from ..web import routes as web_routes
    except ImportError:
        web_routes = None  # type: ignore[assignment]
    if web_routes is not None:
        app.include_router(web_routes.router())
    app.add_middleware(GuardMiddleware, api_keys=keys)
    app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["*"],
                       allow_headers=["*"], expose_headers=[TASK_HEADER])
    return app
