"""Errors in OpenAI's body format ``{"error": {"message", "type", "param", "code"}}``.

Status mapping (see ``docs/gateway.md``):

====  ============================  ==========================================
400   invalid_request_error         malformed JSON, invalid or unsupported parameter, or
                                    no worker offers what the request needs
                                    (``capability_not_served``: tools, a JSON schema, n,
                                    logprobs, embeddings)
401   invalid_request_error         API keys are configured and the key is wrong
403   permission_error              the market did not admit the identity the key
                                    speaks for (``identity_not_admitted``: not a
                                    member of a secure market, or banned)
404   invalid_request_error         unknown model (``model_not_found``) or path
413   invalid_request_error         request body too large
502   server_error                  the worker failed (``worker_error``), the task
                                    was aborted by someone else (``task_aborted``), or
                                    the broker chose a worker outside the gateway's
                                    --trust-worker list (``untrusted_worker``)
503   server_error                  no worker on the market, or the market is not
                                    reachable
504   timeout                       no answer before the task's deadline
====  ============================  ==========================================
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..capabilities import PARAM, Cap
from ..errors import (
    NotAdmitted,
    NoWorkerError,
    TaskAborted,
    TaskError,
    TaskFailed,
    TaskTimeout,
)
from ..protocol import ErrorCode, ProtocolError

log = logging.getLogger("igora.gateway")

INVALID = "invalid_request_error"
SHOULD_RETRY = "x-should-retry"
"""Header the official OpenAI clients obey instead of their own retry rules."""
NO_RETRY = frozenset({502, 504})
"""A worker's failure or a timeout would only repeat: tell clients not to retry."""
SERVER = "server_error"
_CAPS = frozenset(c.value for c in Cap)


class OpenAIError(Exception):
    """An HTTP error with an OpenAI-style body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        headers = dict(headers or {})
        if self.status in NO_RETRY:
            headers[SHOULD_RETRY] = "false"
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def from_igora(exc: Exception, model: str | None) -> OpenAIError:
    """The OpenAI error for an Igora error raised while a task is submitted or run."""
    if isinstance(exc, NoWorkerError):
        if exc.missing:
            param = PARAM.get(Cap(exc.missing[0]), None) if exc.missing[0] in _CAPS else None
            return OpenAIError(
                400,
                f"No worker on the market can serve this request: {exc}. "
                f"Start a worker that offers it (see docs/gateway.md).",
                param=param,
                code="capability_not_served",
            )
        if exc.available and model:
            return OpenAIError(
                404,
                f"The model {model!r} is not served on the market right now "
                f"(served: {', '.join(exc.available)}).",
                param="model",
                code="model_not_found",
            )
        return OpenAIError(
            503,
            f"No worker can take it: {exc.reason}; retry later."
            if exc.reason
            else "No worker is on the market right now: start one with "
            "`igora worker` (or `igora up`), then retry.",
            type=SERVER,
            code="no_worker",
        )
    if isinstance(exc, NotAdmitted):
        return OpenAIError(
            403,
            f"The market does not admit the identity this API key speaks for: {exc}.",
            type="permission_error",
            code="identity_not_admitted",
        )
    if isinstance(exc, TaskTimeout):
        return OpenAIError(504, f"The task timed out: {exc}.", type="timeout", code="task_timeout")
    if isinstance(exc, TaskAborted):
        return OpenAIError(
            502, f"The task was aborted on the market: {exc}.", type=SERVER, code="task_aborted"
        )
    if isinstance(exc, TaskFailed) and exc.code == ErrorCode.UNTRUSTED_WORKER.value:
        return OpenAIError(
            502, f"The market could not serve it: {exc}", type=SERVER, code="untrusted_worker"
        )
    if isinstance(exc, TaskFailed):
        return OpenAIError(
            502, f"The worker could not answer: {exc}", type=SERVER, code="worker_error"
        )
    if isinstance(exc, TaskError):
        return OpenAIError(502, str(exc), type=SERVER, code="task_error")
    if isinstance(exc, ProtocolError):
        return OpenAIError(400, f"Invalid request: {exc}.")
    log.error("unexpected error: %r", exc)
    return OpenAIError(
        500, "The gateway hit an unexpected error; see its log.", type=SERVER, code="internal_error"
    )


TYPE_NAMES = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


def _is_tag(part: Any) -> bool:
    """Whether a part of an error's location names a member of a union (``str``,
    ``constrained-str``, ``list[ChatMessage]``, ``literal['auto']``...), not a field."""
    return isinstance(part, str) and (
        part in TYPE_NAMES or re.fullmatch(r"[a-z_][a-z0-9_]*", part) is None
    )


def _fits(error: Any) -> bool:
    """Whether an error is about the union member the value's own type selects (a list's
    error is the list member's, not "should be a valid string")."""
    tags = [p for p in error.get("loc", ()) if _is_tag(p)]
    if not tags:
        return True
    value, tag = error.get("input"), str(tags[-1])
    if isinstance(value, list):
        return tag.startswith("list[")
    if isinstance(value, str):
        return "str" in tag
    return True


def _param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p != "body" and not _is_tag(p)]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or None


async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = next((e for e in errors if _fits(e)), errors[0] if errors else {})
    kind = first.get("type", "")
    param = _param(tuple(first.get("loc", ())))
    if kind == "json_invalid":
        message = (
            "We could not parse the JSON body of your request: "
            + str(first.get("ctx", {}).get("error", "invalid JSON"))
            + "."
        )
        return OpenAIError(400, message, code="invalid_json").response()
    if kind == "missing":
        if param is None:
            message = "The request needs a JSON body."
        else:
            message = f"Missing required parameter: {param!r}."
        return OpenAIError(400, message, param=param, code="missing_required_parameter").response()
    if param is None and kind in ("model_attributes_type", "dict_type"):
        return OpenAIError(
            400, "The request body must be a JSON object.", code="invalid_value"
        ).response()
    message = (
        f"Invalid value for {param!r}: {first.get('msg', 'invalid')}."
        if param
        else (f"Invalid request body: {first.get('msg', 'invalid')}.")
    )
    if len(errors) > 1:
        message += f" ({len(errors) - 1} more problem(s) in the request.)"
    return OpenAIError(400, message, param=param, code="invalid_value").response()


async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
    message = str(exc.detail) if exc.detail else "error"
    if exc.status_code == 413:
        message = "The request body is too large."
    elif exc.status_code == 404:
        message = f"Unknown path {request.url.path!r}: see /docs for the API."
    elif exc.status_code == 405:
        message = f"Method {request.method} is not allowed on {request.url.path!r}."
    err = OpenAIError(
        exc.status_code,
        message,
        type=INVALID if exc.status_code < 500 else SERVER,
        code=codes.get(exc.status_code),
    )
    return err.response(headers=getattr(exc, "headers", None))


async def _openai(request: Request, exc: OpenAIError) -> JSONResponse:
    return exc.response()


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return OpenAIError(
        500, "The gateway hit an unexpected error; see its log.", type=SERVER, code="internal_error"
    ).response()


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http)  # type: ignore[arg-type]
    app.add_exception_handler(OpenAIError, _openai)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected)
