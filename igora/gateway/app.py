"""The OpenAI-compatible gateway: an HTTP front for the market.

``create_app(...)`` builds a FastAPI application holding one market ``Client`` (named
``openai-gateway``, awareness style ``openai_compatible_endpoint`` as in the original)
for its whole life, in ``app.state.client``. Each API request becomes one task on the
market; the answer is streamed back as it arrives (Server-Sent Events) or returned as
soon as the task is done. A client that goes away aborts its task.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``,
``POST /v1/embeddings``, ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health``,
``GET /openapi.json`` (and ``/docs``), and the web page's routes (``igora.web.routes``).

Where the rest lives: ``guard`` (API keys, body limit), ``translate`` (OpenAI request to
task), ``responses`` (JSON answers), ``streaming`` (SSE), ``routes``, ``state`` (what the
routes share), ``errors`` (OpenAI-style error bodies), ``defaults``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from ..client import DEFAULT_TIMEOUT, Client
from ..identity import IdentityError
from ..protocol import GATEWAY_STYLE
from ..web import routes as web_routes
from . import errors
from .defaults import GATEWAY_NAME, MAX_BODY, STARTUP_SYNC_WAIT, WAIT_WORKER
from .guard import GuardMiddleware
from .keys import KeyStore
from .routes import TASK_HEADER, add_routes
from .state import Gateway
from .streaming import Chunks
from .translate import Job, market_model

__all__ = [  # what other code imports from here (each has its home in the module named)
    "MAX_BODY",
    "TASK_HEADER",
    "Chunks",
    "ClientFactory",
    "GuardMiddleware",
    "Job",
    "create_app",
    "market_model",
]

log = logging.getLogger("igora.gateway")

ClientFactory = Callable[[], Client]


def create_app(
    market: str | None = None,
    room: str | None = None,
    *,
    client_factory: ClientFactory | None = None,
    api_keys: Iterable[str] = (),
    cors_origins: Iterable[str] = ("*",),
    timeout: float = DEFAULT_TIMEOUT,
    wait_worker: float = WAIT_WORKER,
    heartbeat: float | None = None,
    name: str = GATEWAY_NAME,
    key_store: KeyStore | None = None,
    invite: str | None = None,
    trust_workers: Iterable[str] | None = None,
) -> FastAPI:
    """The gateway application.

    ``client_factory`` returns a new, not yet connected ``Client`` (default: one on
    ``market``/``room``, resolved as every Igora command does); the app connects it at
    start-up and closes it at shutdown. ``api_keys``: if any, ``/v1/*`` needs
    ``Authorization: Bearer KEY``. ``timeout``: deadline of each task in seconds.
    ``wait_worker``: seconds a request waits for a worker serving its model to appear.
    ``key_store``: the keys of ``igora gateway keys``; with it ``/v1/*`` needs one of its
    keys (or of ``api_keys``), and ``keys.speaker(request)`` names its identity.
    ``invite``: an invitation to a secure market (``igora market invite``), used once.
    ``trust_workers``: the only workers its prompts go to (``Client``'s).
    """
    keys = tuple(k for k in api_keys if k)

    def default_client() -> Client:
        return Client(
            market,
            room,
            name=name,
            style=GATEWAY_STYLE,
            timeout=timeout,
            invite=invite,
            trust_workers=trust_workers,
        )

    factory = client_factory or default_client

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = factory()
        if heartbeat:
            client.set_heartbeat(heartbeat)
        app.state.client = client
        app.state.gateway = Gateway(client, keys, wait_worker, timeout)
        for entry in key_store.entries() if key_store is not None else ():
            try:  # proved in the first handshake with the gateway's own (security.md §7)
                await client.speak_for(entry.identity())
            except IdentityError as exc:
                log.error("API key %s: its identity is not used: %s", entry.name, exc)
        await client.start()
        if await client.wait_synced(STARTUP_SYNC_WAIT):
            log.info("%s connected to %s", client.name, client.address.room_url)
        elif client.error is not None:  # refused for good: said above, as the session's error
            log.warning(
                "%s: requests fail with 503 market_refused; restart the gateway once the "
                "market admits it",
                client.name,
            )
        else:
            log.warning(
                "%s: market %s not reachable yet; /health answers 503 and requests "
                "fail with 503 until it is",
                client.name,
                client.address.room_url,
            )
        try:
            yield
        finally:
            await client.close()

    app = FastAPI(
        title="Igora OpenAI-compatible gateway",
        lifespan=lifespan,
        description="An OpenAI-compatible API in front of an Igora market: each "
        "request is a task answered by a worker. See docs/gateway.md.",
    )
    errors.install(app)
    add_routes(app)
    app.include_router(web_routes.router())
    app.add_middleware(GuardMiddleware, api_keys=keys, key_store=key_store)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(cors_origins),
        allow_methods=["*"],
        allow_headers=["*"],
        expose_headers=[TASK_HEADER],
    )
    return app
