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
import logging
import os
from collections.abc import AsyncIterator, Sequence
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
from .config import UPSTREAM_TIMEOUT
from .openai_wire import Choices, finish_of, parse_chunk, request_body
from .upstream import (
    UpstreamModel,
    check_base_url,
    parse_models,
    parse_params,
    upstream_message,
    why,
)

DEFAULT_TIMEOUT = UPSTREAM_TIMEOUT
CONNECT_TIMEOUT = 10.0
HEALTH_TIMEOUT = 5.0
ERROR_BODY_LIMIT = 64 * 1024  # bytes of an error answer read to find its message
UNAVAILABLE_STATUS = frozenset({429, 502, 503, 504})  # the upstream, not the request
ALL_CAPS = frozenset(c.value for c in Cap)
"""An upstream is taken to offer everything the OpenAI API has; what it does not support
fails the task with the upstream's own message."""
CONTEXT_FIELDS = ("max_model_len", "context_length", "context_window", "max_context_length")

log = logging.getLogger("igora.engine.openai")

__all__ = [
    "DEFAULT_TIMEOUT",
    "OpenAIEngine",
    "UpstreamModel",
    "check_base_url",
    "parse_models",
    "upstream_message",
]


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
        params: Sequence[str] = (),
    ) -> None:
        self.base_url = check_base_url(base_url)
        self.served = parse_models(models)
        self.params = parse_params(params, self.served)  # alias -> billions, as text
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
        return [
            ModelInfo(m.alias, self._context.get(m.upstream), ALL_CAPS, self.params.get(m.alias))
            for m in self.served
        ]

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
            response = await client.send(client.build_request("POST", url, json=body), stream=True)
            try:
                if response.status_code < 400:
                    if retried:  # it was the field: never send it again
                        self._usage_ok = False
                    elif "stream_options" in body:
                        self._usage_ok = True
                    yield response
                    return
                error = await self._error_of(response)
                if (
                    response.status_code in (400, 422)
                    and "stream_options" in body
                    and self._usage_ok is None
                    and not retried
                ):
                    log.info(
                        "upstream %s refused a request with stream_options (%s); "
                        "trying again without",
                        self.base_url,
                        error,
                    )
                    retried = True
                    body = {k: v for k, v in body.items() if k != "stream_options"}
                    continue
                raise error
            finally:
                await response.aclose()

    # ------------------------------------------------------------------ generation
    async def generate(self, request: Request) -> AsyncIterator[str | Finish]:
        model = self._resolve(request.model)
        body = request_body(model.upstream, request, self._usage_ok is not False)
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
                answers = Choices()
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, ": keep-alive" comments, "event:" lines
                    data = line[5:].strip()
                    if data == "[DONE]":
                        ended = True
                        break
                    chunk = parse_chunk(data, self.base_url)
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
                    raise EngineError(
                        self._cut(
                            pieces,
                            "[DONE] came without a finish reason: interrupted by another request?"
                            if ended
                            else "the stream ended without finishing",
                        )
                    )
                yield answers.finish(finish_of(reason, usage, pieces))
        except EngineError:
            raise
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise self._failed(exc) from None
        except httpx.TimeoutException:
            raise EngineError(
                f"the upstream {self.base_url} sent nothing for {self.timeout:g} s "
                "(upstream timeout); the task was given up"
            ) from None
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            if not answered:  # it dropped the connection before any answer: it is going down
                raise EngineUnavailable(
                    f"the upstream {self.base_url} closed the connection: {why(exc)}"
                ) from None
            raise EngineError(self._cut(pieces, why(exc))) from None
        except httpx.HTTPError as exc:
            raise self._failed(exc) from None
        finally:
            self._in_flight -= 1

    def _failed(self, exc: httpx.HTTPError) -> EngineError:
        """What a request that failed in transport means: the upstream is unreachable
        (unavailable: hand the task back) or the request failed (the task fails)."""
        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
            return EngineUnavailable(f"cannot reach the upstream {self.base_url}: {why(exc)}")
        return EngineError(f"request to the upstream {self.base_url} failed: {why(exc)}")

    def _cut(self, pieces: int, why: str) -> str:
        return f"the upstream {self.base_url} cut the answer off after {pieces} piece(s) ({why})"

    async def _whole(self, response: httpx.Response) -> AsyncIterator[str | Finish]:
        data = parse_chunk((await response.aread()).decode("utf-8", "replace"), self.base_url)
        choices = data.get("choices") or [{}]
        choice = choices[0] if isinstance(choices[0], dict) else {}
        message = choice.get("message") or {}
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str) and content:
            yield content
        answers = Choices()
        for c in choices:
            if isinstance(c, dict):
                answers.add({**c, "delta": c.get("message") or {}}, whole=True)
        raw = data.get("usage")
        usage: dict[str, Any] = raw if isinstance(raw, dict) else {}
        yield answers.finish(finish_of(choice.get("finish_reason"), usage, 1 if content else 0))

    # ------------------------------------------------------------------ embeddings
    async def embed(
        self, inputs: list[str], *, model: str | None = None, dimensions: int | None = None
    ) -> Embeddings:
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
        except httpx.HTTPError as exc:
            raise self._failed(exc) from None
        except (ValueError, KeyError, TypeError) as exc:
            raise EngineError(
                f"the upstream {self.base_url} sent malformed embeddings "
                f"({type(exc).__name__}: {exc})"
            ) from None
        finally:
            self._in_flight -= 1
        if len(vectors) != len(inputs):
            raise EngineError(
                f"the upstream {self.base_url} sent {len(vectors)} embeddings "
                f"for {len(inputs)} inputs"
            )
        tokens = usage.get("prompt_tokens")
        return Embeddings(vectors, int(tokens) if isinstance(tokens, (int, float)) else 0)

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
            return self._note(False, f"cannot reach {self.base_url}: {why(exc)}")
        status = response.status_code
        if status in (401, 403):
            return self._note(
                False,
                f"{self.base_url} refuses the API key (HTTP {status}): "
                f"{upstream_message(response.content)}",
            )
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
            log.warning(
                "upstream %s does not list model(s) %s (it lists: %s); tasks for them may fail",
                self.base_url,
                ", ".join(missing),
                ", ".join(sorted(ids)[:10]),
            )
