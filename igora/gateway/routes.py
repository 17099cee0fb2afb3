"""The gateway's routes: ``/health`` and the OpenAI API (``/v1/...``). Each API request is
translated (``translate``), put on the market as one task, and answered as JSON
(``responses``) or as an event stream (``streaming``). A client that goes away aborts
its task."""

from __future__ import annotations

import inspect
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from ..capabilities import offered
from ..client import Task
from ..credits import pricing
from ..errors import IgoraError
from ..identity import IdentityError
from ..protocol import AgentField, ProtocolError
from . import errors
from .errors import OpenAIError, from_igora
from .keys import speaker
from .openai_models import (
    Balance,
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
    ResponsesRequest,
)
from .responses import completion_response, embedding_response
from .responses_api import ResponsesStream, response_json
from .state import Gateway, gateway_of
from .streaming import AnswerStream, ChatStream, EventStream, Gone, unless_disconnected
from .translate import Job, chat_job, embed_job, responses_job, text_job

log = logging.getLogger("igora.gateway")

TASK_HEADER = "x-igora-task"
"""Response header naming the market task that answered."""


async def speaker_id(gw: Gateway, request: Request) -> str | None:
    """The identity the request's task is put as: its API key's (made known to the
    client at its first request if the key was added while the gateway runs), or None
    for the gateway's own (no stored keys, or an ``--api-key`` key)."""
    key = speaker(request)
    if key is None:
        return None
    if not gw.client.speaks_for(key.id):
        try:
            identity = key.identity()
        except IdentityError as exc:
            log.error("API key %s: %s", key.name, exc)
            raise OpenAIError(
                500,
                f"The gateway cannot read the identity of this API key ({key.name}); see its log.",
                type=errors.SERVER,
                code="identity_unreadable",
            ) from None
        await gw.client.speak_for(identity)
    return key.id


async def run_job(request: Request, job: Job) -> Response:
    """Put the job on the market and answer: JSON, or an event stream."""
    gw = gateway_of(request)
    if not gw.connected:
        refused = gw.client.error
        raise OpenAIError(
            503,
            f"The gateway is not connected to the market {gw.client.address.room_url}"
            + (f": {refused}" if refused else "; retry in a moment."),
            type=errors.SERVER,
            code="market_refused" if refused else "market_unreachable",
        )
    max_tokens = job.options.get("max_tokens")
    speaks = await speaker_id(gw, request)
    try:
        can_pay = await gw.client.can_pay(
            job.prompt, model=job.model, max_tokens=max_tokens, speaker=speaks
        )
    except IgoraError as exc:  # the key's identity is not admitted: 403
        raise from_igora(exc, job.requested) from None
    if not can_pay:
        raise OpenAIError(  # credits.md §5: the identity the gateway speaks as cannot pay
            402,
            "The market's ledger says this identity's credits cannot pay this request "
            "(igora credits shows the balance); earn some by serving, or ask for a transfer.",
            type="insufficient_quota",
            code="insufficient_credits",
        )
    try:
        task = await gw.client.submit(
            job.prompt,  # type: ignore[arg-type]  # None for embeddings
            model=job.model,
            timeout=gw.timeout,
            wait_worker=gw.worker_wait(),
            speaker=speaks,
            **job.options,
        )
    except (IgoraError, ProtocolError) as exc:
        raise from_igora(exc, job.requested) from None
    headers = {TASK_HEADER: task.id}
    log.info(
        "task %s: %s request for model %s%s%s",
        task.id,
        job.kind,
        job.model or "any",
        " (stream)" if job.stream else "",
        f" from user {job.user!r}" if job.user else "",
    )
    events = task.events()
    created = int(time.time())
    outcome: str | dict[str, Any] | Gone | None  # the first event when streaming
    try:
        if not job.stream:
            outcome = await unless_disconnected(request, _drain(events))
        else:
            outcome = await unless_disconnected(request, anext(events))
    except (IgoraError, ProtocolError) as exc:
        err = from_igora(exc, job.requested)
        log.info("task %s: answered %d (%s)", task.id, err.status, exc)
        return err.response(headers)
    if isinstance(outcome, Gone):
        log.info("task %s: the HTTP client went away; task aborted", task.id)
        task.abort()
        return Response(status_code=499)
    if job.kind == "embed":
        return embedding_response(gw, task, job, headers)
    stream: AnswerStream
    if job.kind == "responses":
        if not job.stream:
            return response_json(gw, task, job, created, headers)
        stream = ResponsesStream(gw, task, job, outcome, events, created)
    elif not job.stream:
        return completion_response(gw, task, job, created, headers)
    else:
        stream = ChatStream(gw, task, job, outcome, events, created)
    return EventStream(stream.body(), headers, on_gone=lambda: _gone(task))


async def balance_body(request: Request) -> dict[str, Any]:
    """``GET /v1/igora/balance``: the balance of the identity the request speaks as (its
    API key's, else the gateway's own) in the market's ledger (docs/credits.md §8)."""
    gw = gateway_of(request)
    if not gw.connected:
        raise OpenAIError(
            503,
            f"The gateway is not connected to the market {gw.client.address.room_url}; "
            "retry in a moment.",
            type=errors.SERVER,
            code="market_unreachable",
        )
    if gw.client.v3 is None:
        raise OpenAIError(
            404,
            f"The room {gw.client.address.room_url} speaks protocol 2, which counts no "
            "credits: there is no balance to show.",
            code="no_credits",
        )
    speaks = await speaker_id(gw, request)
    try:
        balance = await gw.client.balance(speaks)
    except IgoraError as exc:
        raise from_igora(exc, None) from None
    if balance is None:
        raise OpenAIError(
            503,
            "The market did not say this identity's balance in time; retry in a moment.",
            type=errors.SERVER,
            code="balance_unavailable",
        )
    return {
        "object": "igora.balance",
        "id": speaks or gw.client.id,
        "balance": balance,
        "unit": "millicredit",
        "credits": pricing.credits_text(balance),
    }


def _gone(task: Task) -> None:
    if task.final is None:
        log.info("task %s: the HTTP client disconnected mid-stream; task aborted", task.id)
        task.abort()


async def _drain(events: AsyncIterator[Any]) -> None:
    async for _ in events:
        pass


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": what}
    for code, what in {
        400: "Malformed or invalid parameters",
        401: "Wrong or missing API key",
        403: "The market did not admit the identity of the API key",
        404: "Unknown model",
        413: "Request body too large",
        502: "The worker failed or the task was aborted",
        503: "No worker on the market, or market unreachable",
        504: "The task timed out",
    }.items()
}
STREAM_DOC = {
    "text/event-stream": {
        "schema": {"type": "string"},
        "example": 'data: {"object": "chat.completion.chunk", ...}\n\ndata: [DONE]\n\n',
    }
}

RESPONSES_STREAM_DOC = {
    "text/event-stream": {
        "schema": {"type": "string"},
        "example": 'event: response.created\ndata: {"type": "response.created", ...}\n\n'
        'event: response.output_text.delta\ndata: {"delta": "Paris", ...}\n\n',
    }
}


class BodyRoute(APIRoute):
    """A route whose endpoint takes ``(body: SomeModel, request: Request)``, served
    without FastAPI's per-request machinery when its body is valid: the JSON parsed and
    the model validated as FastAPI would (``json.loads``, then the model from Python
    objects), the endpoint called at once. Every POST body is declared JSON by then (the
    guard does so, as OpenAI reads any body as JSON), so FastAPI too would parse it. Any
    other body (empty, not JSON, invalid) goes to FastAPI's own handler, which reads the
    same bytes again and answers its error as always. What it saves: ~0.1-0.3 ms of each
    API request's time to first token (dependency solving and the rest of the handler
    FastAPI builds for any route; docs/benchmarks.md, gateway latency). The route's
    OpenAPI entry is FastAPI's."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        fastapi_handler = super().get_route_handler()
        params = inspect.signature(self.endpoint, eval_str=True).parameters
        models = [(n, p.annotation) for n, p in params.items() if _is_model(p.annotation)]
        requests = [n for n, p in params.items() if p.annotation is Request]
        if len(models) != 1 or len(requests) != 1 or len(params) != 2:
            raise TypeError(
                f"{self.path}: a BodyRoute endpoint takes (body: Model, request: Request)"
            )
        (body_name, model), request_name = models[0], requests[0]
        endpoint = self.endpoint

        async def handler(request: Request) -> Response:
            try:
                body = model.model_validate(json.loads(await request.body()))
            except HTTPException:  # the body's limit (guard): 413
                raise
            except Exception:  # not JSON, not valid, too deep...: FastAPI's answer, as always
                return await fastapi_handler(request)
            response: Response = await endpoint(**{body_name: body, request_name: request})
            return response

        return handler


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def add_routes(app: FastAPI) -> None:
    @app.get(
        "/health",
        response_model=Health,
        tags=["gateway"],
        responses={503: {"model": Health, "description": "Not connected to the market"}},
    )
    async def health(request: Request) -> JSONResponse:
        """200 when the gateway is connected to the market, else 503."""
        gw = gateway_of(request)
        connected = gw.connected
        body = Health(
            status="ok" if connected else "connecting",
            market=gw.client.address.room_url,
            connected=connected,
            workers=len(gw.client.workers()) if connected else 0,
            models=gw.client.models() if connected else [],
        )
        return JSONResponse(body.model_dump(), status_code=200 if connected else 503)

    @app.get("/v1/models", response_model=ModelList, tags=["openai"], responses={401: ERRORS[401]})
    async def list_models(request: Request) -> JSONResponse:
        """Models that workers on the market serve right now."""
        return JSONResponse(ModelList(data=_models(gateway_of(request))).model_dump())

    @app.get(
        "/v1/models/{model_id:path}",
        response_model=Model,
        tags=["openai"],
        responses={401: ERRORS[401], 404: ERRORS[404]},
    )
    async def get_model(model_id: str, request: Request) -> JSONResponse:
        """One model served on the market now."""
        for m in _models(gateway_of(request)):
            if m.id == model_id:
                return JSONResponse(m.model_dump())
        raise OpenAIError(
            404,
            f"The model {model_id!r} is not served on the market right now.",
            param="model",
            code="model_not_found",
        )

    @app.get(
        "/v1/igora/balance",
        response_model=Balance,
        tags=["igora"],
        responses={
            401: ERRORS[401],
            403: ERRORS[403],
            404: {"model": ErrorBody, "description": "A protocol 2 room: no credits"},
            503: {"model": ErrorBody, "description": "Market unreachable or silent"},
        },
    )
    async def balance(request: Request) -> JSONResponse:
        """The credits of the identity the request speaks as (its API key's, else the
        gateway's), in millicredits, from the market's ledger (a protocol 3 room)."""
        return JSONResponse(Balance.model_validate(await balance_body(request)).model_dump())

    api = APIRouter(route_class=BodyRoute)

    @api.post(
        "/v1/chat/completions",
        response_model=ChatCompletion,
        tags=["openai"],
        responses={200: {"content": STREAM_DOC}, **ERRORS},
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        """A chat answer from a worker on the market (``stream: true`` for SSE chunks)."""
        return await run_job(request, chat_job(body))

    @api.post(
        "/v1/responses",
        tags=["openai"],
        responses={200: {"content": RESPONSES_STREAM_DOC}, **ERRORS},
    )
    async def responses(body: ResponsesRequest, request: Request) -> Response:
        """OpenAI's Responses API: the answer as a ``response`` object, or its typed events
        (``stream: true``); put on the market as a chat task (docs/gateway.md)."""
        return await run_job(request, responses_job(body))

    @app.api_route(
        "/v1/responses/{response_id:path}",
        methods=["GET", "DELETE", "POST"],
        tags=["openai"],
        responses={404: {"model": ErrorBody, "description": "The gateway stores no responses"}},
    )
    async def stored_response(response_id: str) -> JSONResponse:
        """Stored responses (retrieve, delete, cancel, input items): none is kept."""
        raise OpenAIError(
            404,
            f"No response {response_id!r}: the gateway stores no responses (each answer "
            "comes in its request's own response; docs/gateway.md, /v1/responses).",
            code="response_not_found",
        )

    @api.post("/v1/embeddings", response_model=EmbeddingList, tags=["openai"], responses=ERRORS)
    async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
        """Vectors for one text or a list of texts, from a worker whose model embeds."""
        return await run_job(request, embed_job(body))

    @api.post(
        "/v1/completions",
        response_model=Completion,
        tags=["openai"],
        responses={200: {"content": STREAM_DOC}, **ERRORS},
    )
    async def completions(body: CompletionRequest, request: Request) -> Response:
        """Legacy text completion: the prompt is sent to a worker as one user message."""
        return await run_job(request, text_job(body))

    app.include_router(api)


def _models(gw: Gateway) -> list[Model]:
    """The models served now, each with what at least one of its workers offers on it
    (the extra field ``capabilities``)."""
    first_seen: dict[str, float] = {}
    caps: dict[str, set[str]] = {}
    for peer in gw.client.workers():
        since = peer.state.get(AgentField.SINCE)
        since = since / 1000 if isinstance(since, (int, float)) else gw.started
        for name in peer.models:
            first_seen[name] = min(first_seen.get(name, since), since)
            caps.setdefault(name, set()).update(offered(peer, name))
    return [
        Model(
            id=name,
            created=int(first_seen[name]),
            owned_by="igora-market",
            capabilities=sorted(caps[name]),
        )
        for name in sorted(first_seen)
    ]
