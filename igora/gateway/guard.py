"""The gateway's ASGI guard: API keys and the body limit, checked before any parsing."""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .defaults import MAX_BODY
from .errors import OpenAIError
from .keys import KeyStore


class GuardMiddleware:
    """API-key check on ``/v1/*`` and a limit on the request body, before any parsing,
    so a wrong key is always a 401 and a huge body a 413; POST bodies are read as JSON
    whatever their declared type. A key of ``key_store`` (``igora gateway keys``) sets
    the request's ``state.api_key`` (``keys.speaker``): the identity it speaks for."""

    def __init__(
        self,
        app: ASGIApp,
        api_keys: Iterable[str],
        max_body: int = MAX_BODY,
        key_store: KeyStore | None = None,
    ) -> None:
        self.app = app
        self.keys = tuple(k for k in api_keys if k)
        self.store = key_store
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {
            k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])
        }
        path: str = scope.get("path", "")
        checked = self.keys or self.store is not None
        if checked and path.startswith("/v1") and scope.get("method") != "OPTIONS":
            error = self._auth_error(headers.get("authorization"), scope)
            if error is not None:
                await error.response()(scope, receive, send)
                return
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            err = OpenAIError(
                413,
                f"The request body is larger than {self.max_body} bytes.",
                code="request_too_large",
            )
            await err.response()(scope, receive, send)
            return
        if scope.get("method") == "POST" and "json" not in headers.get("content-type", ""):
            # Read every POST body as JSON, as OpenAI does (curl -d sends a form type).
            scope = dict(scope)
            scope["headers"] = [
                (k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-type"
            ]
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

    def _auth_error(self, header: str | None, scope: Scope) -> OpenAIError | None:
        if not header:
            return OpenAIError(
                401,
                "You didn't provide an API key: send it in the 'Authorization: Bearer KEY' header.",
                code="invalid_api_key",
            )
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() == "bearer" and any(
            hmac.compare_digest(token.encode(), k.encode()) for k in self.keys
        ):
            return None
        stored = self.store.lookup(token) if scheme.lower() == "bearer" and self.store else None
        if stored is not None:  # found by the hash of the key: nothing to compare in time
            scope.setdefault("state", {})["api_key"] = stored
            return None
        return OpenAIError(401, "Incorrect API key provided.", code="invalid_api_key")
