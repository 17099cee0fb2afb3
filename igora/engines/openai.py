"""Any OpenAI-compatible server as an engine: Ollama, vLLM, llama.cpp's server,
LM Studio, llama-cpp-python's server, or a hosted API.

The worker serves one or several of the upstream's models, each under the name it
advertises on the market (``NAME=ALIAS``: the upstream's model id, then the market
name). Requests go to ``POST {base_url}/chat/completions`` with ``stream: true``;
closing the generator (abort) closes the HTTP response, so the upstream sees the
client go away at once.

Failures are sorted by who can do something about them:

- the upstream cannot be reached (connection refused or timed out, HTTP 429, 502, 503,
  504): ``EngineUnavailable`` -- another worker may serve the task;
- the upstream refused or broke this request (other 4xx and 5xx, nothing received for
  ``timeout`` seconds, the stream cut before its end): ``EngineError``, the task fails
  with the upstream's own message.

``available()`` asks ``GET {base_url}/models``: the worker polls it and advertises
itself busy while the upstream is down or refuses the API key.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from ..capabilities import Cap
from .base import (
    Embeddings,
    Engine,
    EngineError,
    EngineUnavailable,
    Finish,
    ModelInfo,
    Request,
)

DEFAULT_TIMEOUT = 300.0
"""Seconds the upstream may stay silent (before its first byte or between two chunks)."""
CONNECT_TIMEOUT = 10.0
HEALTH_TIMEOUT = 5.0
ERROR_BODY_LIMIT = 64 * 1024  # bytes of an error answer read to find its message
UNAVAILABLE_STATUS = frozenset({429, 502, 503, 504})  # the upstream, not the request
FINISH_REASONS = frozenset({"stop", "length", "content_filter", "tool_calls"})
ALL_CAPS = frozenset(c.value for c in Cap)
"""An upstream is taken to offer everything the OpenAI API has; what it does not support
fails the task with the upstream's own message."""
CONTEXT_FIELDS = ("max_model_len", "context_length", "context_window", "max_context_length")

log = logging.getLogger("igora.engine.openai")


@dataclass(frozen=True)
class UpstreamModel:
    """One served model: ``upstream`` is the id sent to the server, ``alias`` the name
    advertised on the market (what tasks ask for)."""

    upstream: str
    alias: str

    @classmethod
    def parse(cls, spec: str) -> UpstreamModel:
        """``NAME`` or ``NAME=ALIAS``."""
        name, sep, alias = str(spec).strip().partition("=")
        name, alias = name.strip(), alias.strip()
        if not name or (sep and not alias):
            raise EngineError(
                f"model {spec!r} is malformed: give NAME or NAME=ALIAS (NAME is the "
                "upstream's model id, ALIAS the name tasks ask for on the market)"
            )
        return cls(name, alias or name)


def parse_models(specs: Sequence[str]) -> list[UpstreamModel]:
    models = [UpstreamModel.parse(s) for s in specs]
    if not models:
        raise EngineError("give at least one model: --model NAME[=ALIAS]")
    seen: set[str] = set()
    for m in models:
        if m.alias in seen:
            raise EngineError(f"two models are advertised as {m.alias!r}: give distinct aliases")
        seen.add(m.alias)
    return models


def check_base_url(base_url: str) -> str:
    url = str(base_url).strip().rstrip("/")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise EngineError(f"base URL {base_url!r} is not a URL ({exc})") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise EngineError(
            f"base URL {base_url!r} must look like http://host:port/v1 (e.g. Ollama: "
            "http://localhost:11434/v1)"
        )
    return url


def upstream_message(body: bytes) -> str:
    """The human part of an error answer (OpenAI, FastAPI and plain-text shapes)."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text[:500] or "(empty answer)"
    if isinstance(data, dict):
        err = data.get("error", data.get("detail", data.get("message")))
        if isinstance(err, dict):
            err = err.get("message") or err.get("msg") or err
        if isinstance(err, list) and err and isinstance(err[0], dict):  # FastAPI validation
            err = "; ".join(str(e.get("msg", e)) for e in err[:3])
        if err is not None:
            return str(err)[:500]
    return text[:500]


class OpenAIEngine(Engine):
    kind = "openai"

    def __init__(
        self,
        base_url: str,
        models: Sequence[str],
        *,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
        context_length: int | None = None,
    ) -> None:
        self.base_url = check_base_url(base_url)
        self.served = parse_models(models)
        if not timeout or timeout <= 0:
            raise EngineError("the upstream timeout must be a positive number of seconds")
        self.timeout = float(timeout)
        self.connect_timeout = float(connect_timeout)
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self._context: dict[str, int | None] = {m.upstream: context_length for m in self.served}
        self._by_alias = {m.alias: m for m in self.served}
        self._usage_ok: bool | None = None  # does the upstream accept stream_options?
        self._client: httpx.AsyncClient | None = None
        self._health: tuple[bool, str] = (True, "")
        self._in_flight = 0  # requests being answered now
        self._missing_warned = False

    # ------------------------------------------------------------------ models
    def models(self) -> list[ModelInfo]:
        return [ModelInfo(m.alias, self._context.get(m.upstream), ALL_CAPS) for m in self.served]

    def _resolve(self, alias: str | None) -> UpstreamModel:
        if not alias:
            return self.served[0]
        model = self._by_alias.get(alias)
        if model is None:
            raise EngineError(f"this worker does not serve model {alias!r}")
        return model

    # ------------------------------------------------------------------ http
    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            headers = {"Accept": "text/event-stream, application/json"}
            if self.api_key:
                headers["Authorization"] = f"Bearer {self.api_key}"
            self._client = httpx.AsyncClient(
                headers=headers,
                timeout=httpx.Timeout(self.timeout, connect=self.connect_timeout),
                limits=httpx.Limits(max_keepalive_connections=8),
            )
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _body(self, model: UpstreamModel, request: Request) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model.upstream, "messages": request.messages,
                                "stream": True}
        if self._usage_ok is not False:
            body["stream_options"] = {"include_usage": True}
        optional = {"max_tokens": request.max_tokens, "temperature": request.temperature,
                    "top_p": request.top_p, "seed": request.seed, "stop": request.stop or None,
                    "tools": request.tools or None, "tool_choice": request.tool_choice,
                    "response_format": request.response_format,
                    "n": request.n if request.n > 1 else None,
                    "logprobs": True if request.logprobs else None,
                    "top_logprobs": request.top_logprobs if request.logprobs else None}
        body.update({k: v for k, v in optional.items() if v is not None})
        return body

    async def _error_of(self, response: httpx.Response) -> EngineError:
        body = b""
        with contextlib.suppress(httpx.HTTPError):
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) >= ERROR_BODY_LIMIT:
                    break
        status = response.status_code
        message = f"upstream {self.base_url} answered HTTP {status}: {upstream_message(body)}"
        if status == 404:
            message += " (check the model name and that the base URL ends with /v1)"
        if status in UNAVAILABLE_STATUS:
            return EngineUnavailable(message)
        return EngineError(message)

    @contextlib.asynccontextmanager
    async def _open(self, body: dict[str, Any]) -> AsyncIterator[httpx.Response]:
        """The streaming response; retried once without ``stream_options`` when the
        upstream rejects that field (older servers)."""
        client = self._http()
        url = f"{self.base_url}/chat/completions"
        retried = False
        while True:
            response = await client.send(client.build_request("POST", url, json=body),
                                         stream=True)
            try:
                if response.status_code < 400:
                    if retried:  # it was the field: never send it again
                        self._usage_ok = False
                    elif "stream_options" in body:
                        self._usage_ok = True
                    yield response
                    return
                error = await self._error_of(response)
                if (response.status_code in (400, 422) and "stream_options" in body
                        and self._usage_ok is None and not retried):
                    log.info("upstream %s refused a request with stream_options (%s); "
                             "trying again without", self.base_url, error)
                    retried = True
                    body = {k: v for k, v in body.items() if k != "stream_options"}
                    continue
                raise error
            finally:
                await response.aclose()

    # ------------------------------------------------------------------ generation
    async def generate(self, request: Request) -> AsyncIterator[str | Finish]:
        model = self._resolve(request.model)
        body = self._body(model, request)
        pieces = 0
        answered = False
        self._in_flight += 1
        try:
            async with self._open(body) as response:
                answered = True
                kind = response.headers.get("content-type", "")
                if kind.startswith("application/json"):  # an upstream that ignores stream
                    async for item in self._whole(response):
                        yield item
                    return
                reason: str | None = None
                usage: dict[str, Any] = {}
                ended = False
                answers = _Choices()
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, ": keep-alive" comments, "event:" lines
                    data = line[5:].strip()
                    if data == "[DONE]":
                        ended = True
                        break
                    chunk = self._chunk(data)
                    if isinstance(chunk.get("usage"), dict):
                        usage = chunk["usage"]
                        self._usage_ok = True
                    for choice in chunk.get("choices") or []:
                        if not isinstance(choice, dict):
                            continue
                        content = answers.add(choice)
                        if choice.get("index", 0) != 0:
                            continue
                        if content:
                            pieces += 1
                            yield content
                        if choice.get("finish_reason"):
                            reason = str(choice["finish_reason"])
                if reason is None:  # llama-cpp-python's server ends an interrupted stream so
                    raise EngineError(self._cut(
                        pieces, "[DONE] came without a finish reason: interrupted by another "
                                "request?" if ended else "the stream ended without finishing"))
                yield answers.finish(self._finish(reason, usage, pieces))
        except EngineError:
            raise
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise EngineUnavailable(
                f"cannot reach the upstream {self.base_url}: {_why(exc)}") from None
        except httpx.TimeoutException:
            raise EngineError(
                f"the upstream {self.base_url} sent nothing for {self.timeout:g} s "
                "(upstream timeout); the task was given up") from None
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            if not answered:  # it dropped the connection before any answer: it is going down
                raise EngineUnavailable(
                    f"the upstream {self.base_url} closed the connection: {_why(exc)}") from None
            raise EngineError(self._cut(pieces, _why(exc))) from None
        except httpx.HTTPError as exc:
            raise EngineError(
                f"request to the upstream {self.base_url} failed: {_why(exc)}") from None
        finally:
            self._in_flight -= 1

    def _cut(self, pieces: int, why: str) -> str:
        return (f"the upstream {self.base_url} cut the answer off after {pieces} piece(s) "
                f"({why})")

    def _chunk(self, data: str) -> dict[str, Any]:
        try:
            chunk = json.loads(data)
        except ValueError:
            raise EngineError(f"the upstream {self.base_url} sent a malformed chunk: "
                              f"{data[:200]!r}") from None
        if not isinstance(chunk, dict):
            raise EngineError(
                f"the upstream {self.base_url} sent a malformed chunk: {data[:200]!r}")
        if chunk.get("error"):
            err = chunk["error"]
            message = err.get("message", err) if isinstance(err, dict) else err
            raise EngineError(f"the upstream {self.base_url} failed mid-answer: {message}")
        return chunk

    async def _whole(self, response: httpx.Response) -> AsyncIterator[str | Finish]:
        data = self._chunk((await response.aread()).decode("utf-8", "replace"))
        choices = data.get("choices") or [{}]
        choice = choices[0] if isinstance(choices[0], dict) else {}
        message = choice.get("message") or {}
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str) and content:
            yield content
        answers = _Choices()
        for c in choices:
            if isinstance(c, dict):
                answers.add({**c, "delta": c.get("message") or {}}, whole=True)
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        yield answers.finish(self._finish(choice.get("finish_reason"), usage,
                                          1 if content else 0))

    # ------------------------------------------------------------------ embeddings
    async def embed(self, inputs: list[str], *, model: str | None = None,
                    dimensions: int | None = None) -> Embeddings:
        upstream = self._resolve(model)
        body: dict[str, Any] = {"model": upstream.upstream, "input": inputs}
        if dimensions is not None:
            body["dimensions"] = dimensions
        url = f"{self.base_url}/embeddings"
        self._in_flight += 1
        try:
            response = await self._http().post(url, json=body)
            if response.status_code >= 400:
                raise await self._error_of(response)
            data = response.json()
            rows = sorted(data["data"], key=lambda r: r.get("index", 0))
            vectors = [[float(x) for x in r["embedding"]] for r in rows]
            usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        except EngineError:
            raise
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise EngineUnavailable(
                f"cannot reach the upstream {self.base_url}: {_why(exc)}") from None
        except httpx.HTTPError as exc:
            raise EngineError(
                f"request to the upstream {self.base_url} failed: {_why(exc)}") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise EngineError(f"the upstream {self.base_url} sent malformed embeddings "
                              f"({type(exc).__name__}: {exc})") from None
        finally:
            self._in_flight -= 1
        if len(vectors) != len(inputs):
            raise EngineError(f"the upstream {self.base_url} sent {len(vectors)} embeddings "
                              f"for {len(inputs)} inputs")
        tokens = usage.get("prompt_tokens")
        return Embeddings(vectors, int(tokens) if isinstance(tokens, (int, float)) else 0)

    @staticmethod
    def _finish(reason: str | None, usage: dict[str, Any], pieces: int) -> Finish:
        def count(key: str) -> int | None:
            v = usage.get(key)
            return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

        completion = count("completion_tokens")
        return Finish(
            reason if reason in FINISH_REASONS else "stop",
            count("prompt_tokens") or 0,
            completion if completion is not None else pieces,  # no usage: one piece ~ a token
        )

    # ------------------------------------------------------------------ health
    async def available(self) -> bool:
        if self._in_flight:
            # A request in progress already tells whether the upstream is there, and a poll
            # would hurt: llama-cpp-python's server interrupts a running stream on any new
            # request (its --interrupt_requests default), even GET /models.
            return self._health[0]
        try:
            response = await self._http().get(f"{self.base_url}/models", timeout=HEALTH_TIMEOUT)
        except httpx.HTTPError as exc:
            return self._note(False, f"cannot reach {self.base_url}: {_why(exc)}")
        status = response.status_code
        if status in (401, 403):
            return self._note(False, f"{self.base_url} refuses the API key (HTTP {status}): "
                                     f"{upstream_message(response.content)}")
        if status >= 500:
            return self._note(False, f"{self.base_url}/models answered HTTP {status}")
        if status == 200:
            self._learn(response)
        return self._note(True, "")

    def _note(self, ok: bool, why: str) -> bool:
        if (ok, why) != self._health:
            if ok:
                log.info("upstream %s answers", self.base_url)
            else:
                log.warning("upstream unavailable: %s", why)
            self._health = (ok, why)
        return ok

    def _learn(self, response: httpx.Response) -> None:
        """Context lengths the upstream lists, and a warning for models it does not list."""
        try:
            listed = response.json().get("data")
        except (ValueError, AttributeError):
            return
        if not isinstance(listed, list):
            return
        ids = set()
        for entry in listed:
            if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
                continue
            ids.add(entry["id"])
            if entry["id"] in self._context:
                for key in CONTEXT_FIELDS:
                    v = entry.get(key)
                    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                        self._context[entry["id"]] = v
                        break
        missing = [m.upstream for m in self.served if m.upstream not in ids]
        if missing and ids and not self._missing_warned:
            self._missing_warned = True
            log.warning("upstream %s does not list model(s) %s (it lists: %s); tasks for them "
                        "may fail", self.base_url, ", ".join(missing), ", ".join(sorted(ids)[:10]))


class _Choices:
    """The choices of an upstream answer, put together from its chunks: content, tool
    calls (their ``arguments`` arrive in fragments), log probabilities, finish reason."""

    def __init__(self) -> None:
        self.content: dict[int, str] = {}
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
        self.content[index] = self.content.get(index, "") + content
        for j, call in enumerate(delta.get("tool_calls") or []):
            if not isinstance(call, dict):
                continue
            slot = call.get("index", j) if not whole else j
            mine = self.calls.setdefault(index, {}).setdefault(
                slot, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
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
        choices = [{"index": i, "content": self.content.get(i, ""), "toolCalls": self._calls(i),
                    "finishReason": self.reasons.get(i, "stop"),
                    "tokenLogprobs": self._logprobs(i)} for i in indexes]
        return Finish(first.reason, first.prompt_tokens, first.completion_tokens,
                      tool_calls=self._calls(0), logprobs=self._logprobs(0),
                      choices=choices if len(choices) > 1 else None)


def _why(exc: BaseException) -> str:
    """A short reason, looking through httpx's wrapping for the socket error."""
    seen: BaseException | None = exc
    for _ in range(6):
        if seen is None:
            break
        if isinstance(seen, ConnectionRefusedError) or "Connection refused" in str(seen):
            return "connection refused"
        if isinstance(seen, socket.gaierror):
            return f"unknown host ({seen})"
        seen = seen.__cause__ or seen.__context__
    return str(exc).strip() or type(exc).__name__
