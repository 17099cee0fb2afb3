"""The web page's routes, included by the gateway: the page, its assets, the market view.

- ``GET /``: the page (plain HTML, CSS and JavaScript modules; no build step, no CDN);
- ``GET /static/{file}``: its assets;
- ``GET /api/market``: one JSON snapshot of the market (see ``market_view.py``);
- ``GET /api/market/events``: Server-Sent Events, a snapshot each time the market changes
  (at most ``MAX_RATE`` per second, at least every ``KEEPALIVE`` seconds).

The chat itself uses the gateway's OpenAI API (``/v1/chat/completions``, ``/v1/models``).
The market is read from ``app.state.client`` (a connected ``igora.Client``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from .market_view import MarketTracker, tracker_for

STATIC = Path(__file__).resolve().parent / "static"
MAX_RATE = 4.0
"""Snapshots per second pushed to one page at most."""
KEEPALIVE = 15.0
"""Seconds after which an unchanged snapshot is sent again (keeps proxies from closing)."""
REFRESH = 2.0
"""Seconds between two looks at the market when nothing changed (throughput windows slide)."""

TYPES = {
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".html": "text/html",
}
NO_CACHE = {"Cache-Control": "no-cache"}
FILES = {p.relative_to(STATIC).as_posix(): p for p in STATIC.rglob("*") if p.is_file()}
"""The assets, by the name ``/static/`` serves them under. A request is looked up here, never
on the disk: a NUL byte or a 5,000-character name made path resolution raise (HTTP 500),
and nothing outside this folder can be named."""


def _unavailable() -> JSONResponse:
    return JSONResponse(
        {
            "error": {
                "message": "the gateway is not connected to a market",
                "type": "server_error",
                "code": "no_market",
            }
        },
        status_code=503,
    )


async def _events(request: Request, tracker: MarketTracker) -> AsyncIterator[str]:
    last = ""
    last_sent = 0.0
    loop = asyncio.get_running_loop()
    yield "retry: 2000\n\n"
    while not await request.is_disconnected():
        version = tracker.version
        snap = await tracker.current()
        body = json.dumps({k: v for k, v in snap.items() if k != "time"}, sort_keys=True)
        now = loop.time()
        if body != last or now - last_sent >= KEEPALIVE:
            last, last_sent = body, now
            yield f"event: market\ndata: {json.dumps(snap)}\n\n"
        await tracker.wait_change(version, REFRESH)
        await asyncio.sleep(1 / MAX_RATE)


def router() -> APIRouter:
    """The routes of the web page, to include in the gateway's FastAPI app."""
    r = APIRouter()

    @r.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html", headers=NO_CACHE)

    @r.get("/static/{name:path}", include_in_schema=False)
    async def static(name: str) -> Response:
        path = FILES.get(name)
        if path is None:
            shown = name if len(name) <= 80 else name[:80] + "..."
            return JSONResponse(
                {
                    "error": {
                        "message": f"no file {shown!r}",
                        "type": "invalid_request_error",
                        "code": "not_found",
                    }
                },
                status_code=404,
            )
        return FileResponse(
            path, media_type=TYPES.get(path.suffix, "application/octet-stream"), headers=NO_CACHE
        )

    @r.get("/api/market", tags=["web"], summary="Agents, tasks by state and throughput")
    async def market(request: Request) -> Response:
        tracker = tracker_for(request.app.state)
        if tracker is None:
            return _unavailable()
        return JSONResponse(await tracker.current())

    @r.get(
        "/api/market/events",
        tags=["web"],
        summary="Server-Sent Events: a market snapshot whenever it changes",
    )
    async def market_events(request: Request) -> Response:
        tracker = tracker_for(request.app.state)
        if tracker is None:
            return _unavailable()
        return StreamingResponse(
            _events(request, tracker),
            media_type="text/event-stream",
            headers={**NO_CACHE, "X-Accel-Buffering": "no"},
        )

    return r
