"""Gateway latency (issues #4 and #19): time to first token of a streamed OpenAI chat
completion through gateway + market + broker + worker, against ``igora.Client`` asking
the same room (what the gateway's hop adds) and the engine called directly (what the
whole market adds), in a protocol 2 room and in a protocol 3 room."""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

import httptools
import httpx

from igora import Client
from igora.engines.base import Engine

from .common import ENGINE_LABELS, Cluster, Section, Target, free_port, ms, pct, table, wait_http
from .overhead import _prompt, direct_ttft, market_ttft

NAME = "gateway"
SETTLE = 0.05
"""Seconds of pause before each timed request: the previous path's last messages (the
benchmark's own ``Client`` reads its task's end, drops and notices after its stream)
are handled first, so that no path is timed while this process still works for the one
before it."""

FLOOR_CHUNK = b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'


async def floor(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The HTTP hop alone: an ASGI app (served by uvicorn in its own process, as the
    gateway is) that reads the request and streams one content chunk at once. What the
    same httpx request costs through it is the floor of any HTTP proxy's hop here."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    headers = [(b"content-type", b"text/event-stream")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": FLOOR_CHUNK, "more_body": True})
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


def chat_body(model: str, prompt: str, **options: object) -> dict[str, Any]:
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": prompt}]}
    return body | options


def has_content(line: str) -> bool:
    """Whether an SSE line is a chunk with text (not the opening chunk's empty one)."""
    if not line.startswith("data: {"):
        return False
    choices = json.loads(line[6:]).get("choices") or [{}]
    return bool((choices[0].get("delta") or {}).get("content"))


async def gateway_ttft(
    http: httpx.AsyncClient, base: str, model: str, prompt: str, **options: object
) -> float:
    t0 = time.perf_counter()
    first = None
    body = chat_body(model, prompt, **options)
    async with http.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if first is None and has_content(line):
                first = time.perf_counter() - t0
    return first if first is not None else time.perf_counter() - t0


class LeanHTTP:
    """A minimal HTTP/1.1 client on one keep-alive connection: the request written as
    bytes, the response parsed by httptools (uvicorn's C parser). What a streamed request
    costs without an HTTP client library's own work per request (httpx's: the difference
    between the two floors), which the reference path, ``igora.Client`` over its
    websocket, does not pay either."""

    def __init__(self, base: str) -> None:
        self.host, port = base.removeprefix("http://").split(":")
        self.port = int(port)
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._body = bytearray()
        self._complete = False

    # httptools' callbacks
    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        self._complete = True

    async def ttft(self, model: str, prompt: str, **options: object) -> float:
        if self._conn is None or self._conn[0].at_eof():  # new, or closed by the server idle
            await self.close()
            self._conn = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._conn
        payload = json.dumps(chat_body(model, prompt, **options)).encode()
        t0 = time.perf_counter()
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: %s:%d\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (self.host.encode(), self.port, len(payload), payload)
        )
        parser = httptools.HttpResponseParser(self)
        self._body.clear()
        self._complete = False
        first = None
        seen = 0  # body bytes already scanned for complete lines
        while not self._complete:
            data = await reader.read(65536)
            if not data:
                raise ConnectionError(
                    f"{self.host}:{self.port} closed the connection mid-response "
                    f"(body so far: {bytes(self._body)[:200]!r})"
                )
            parser.feed_data(data)
            if first is None:
                end = self._body.rfind(b"\n")
                if end >= seen:
                    lines = self._body[seen:end].decode().splitlines()
                    seen = end + 1
                    if any(has_content(line) for line in lines):
                        first = time.perf_counter() - t0
        if parser.get_status_code() != 200:
            raise RuntimeError(f"HTTP {parser.get_status_code()}: {self._body.decode()}")
        return first if first is not None else time.perf_counter() - t0

    async def close(self) -> None:
        if self._conn is not None:
            self._conn[1].close()
            self._conn = None


PATHS = ("direct", "floor", "floor_lean", "c2", "v2", "v2_lean", "c3", "v3", "v3_lean")


async def measure(engine_name: str, n: int, warm: int = 3) -> dict[str, list[float]]:
    """Time to first token of the engine called directly, and in a protocol 2 room and a
    protocol 3 room of the same market through ``igora.Client`` (in this process) and
    through a gateway, the five interleaved request by request."""
    with Cluster(f"gateway-{engine_name}", protocol=3) as c:
        c.room_market()
        c.broker("--heartbeat", "1", name="broker-v2")
        c.room_broker("--heartbeat", "1", name="broker-v3")
        if engine_name == "echo":
            from igora.engines.echo import EchoEngine

            engine: Engine = EchoEngine()
            model, opts = "echo", {}
        else:
            from igora.engines.llama import LlamaEngine, bundled_model

            engine = LlamaEngine(bundled_model())
            model = engine.models()[0].name
            opts = {"max_tokens": 4, "temperature": 0.0, "seed": 1}
        c.worker(engine=engine_name, name="worker-v2")
        c.room_worker(engine=engine_name, name="worker-v3")
        gw = ("--log-level", "warning", "--wait-worker", "30")
        _, base2 = c.gateway(*gw, name="gateway-v2")
        _, base3 = c.room_gateway(*gw, name="gateway-v3")
        await c.wait_agents_async("worker", 2, timeout=180)
        await c.wait_agents_async("broker", 2, timeout=180)
        port = free_port()
        hop = c.spawn(
            "bench.gateway:floor",
            "--port",
            str(port),
            "--log-level",
            "warning",
            name="http-floor",
            module="uvicorn",
        )
        base_floor = f"http://127.0.0.1:{port}"
        wait_http(f"{base_floor}/", 30, hop)
        os.environ["IGORA_DATA"] = c.agent_data("bench-client")["IGORA_DATA"]  # v3 identity
        client2 = Client(c.url, timeout=120)
        client3 = Client(c.url, c.V3_ROOM, timeout=120)
        lean = {k: LeanHTTP(b) for k, b in (("floor", base_floor), ("v2", base2), ("v3", base3))}
        out: dict[str, list[float]] = {k: [] for k in PATHS}
        async with httpx.AsyncClient(timeout=120) as http, client2, client3:
            for i in range(warm + n):
                # The client's prompt and the gateway's differ from their first word: a
                # worker's engine caches a prompt's prefix (llama.cpp), and the path asked
                # second would otherwise find the first one's prompt computed. The lean
                # client's prompt differs from httpx's for the same reason.
                ask, via, lv = (f"{w} {_prompt(i)}" for w in ("client", "gateway", "lean"))
                paths = {  # coroutines: each starts its clock when awaited
                    "direct": direct_ttft(engine, via, **opts),
                    "floor": gateway_ttft(http, base_floor, model, via),
                    "floor_lean": lean["floor"].ttft(model, lv),
                    "c2": market_ttft(client2, ask, **opts),
                    "v2": gateway_ttft(http, base2, model, via, **opts),
                    "v2_lean": lean["v2"].ttft(model, lv, **opts),
                    "c3": market_ttft(client3, ask, **opts),
                    "v3": gateway_ttft(http, base3, model, via, **opts),
                    "v3_lean": lean["v3"].ttft(model, lv, **opts),
                }
                times = {}
                for key, path in paths.items():
                    await asyncio.sleep(SETTLE)
                    times[key] = await path
                if i >= warm:
                    for k, t in times.items():
                        out[k].append(t)
        for one in lean.values():
            await one.close()
        await engine.close()
        return out


CLIENTS = (("httpx", ""), ("lean", "_lean"))
"""The HTTP clients timed (their label, their paths' suffix): httpx, the openai SDK's own,
and ``LeanHTTP``."""


async def run(quick: bool) -> Section:
    rows = []
    targets = []
    data = {}
    for engine_name, n in (("echo", 50 if quick else 300), ("llama", 8 if quick else 30)):
        r = await measure(engine_name, n)
        d50, d99 = pct(r["direct"], 50), pct(r["direct"], 99)
        data[engine_name] = {"direct_p50": d50, "direct_p99": d99}
        label = ENGINE_LABELS[engine_name]
        for protocol in ("v2", "v3"):
            client = r["c" + protocol[1]]
            c50, c99 = pct(client, 50), pct(client, 99)
            data[engine_name] |= {f"{protocol}_client_p50": c50, f"{protocol}_client_p99": c99}
            added = {}
            for http, suffix in CLIENTS:
                path = r[protocol + suffix]
                g50, g99, f50 = pct(path, 50), pct(path, 99), pct(r["floor" + suffix], 50)
                h50 = pct([g - c for g, c in zip(path, client, strict=True)], 50)
                added[http] = g50 - c50
                data[engine_name] |= {
                    f"http_floor{suffix}_p50": f50,
                    f"{protocol}{suffix}_p50": g50,
                    f"{protocol}{suffix}_p99": g99,
                    f"{protocol}{suffix}_hop_p50": h50,
                }
                rows.append(
                    [
                        label,
                        protocol,
                        http,
                        n,
                        ms(d50),
                        ms(c50),
                        ms(c99),
                        ms(g50),
                        ms(g99),
                        ms(g50 - c50),
                        ms(h50),
                        ms(f50),
                        ms(g50 - d50),
                    ]
                )
            if engine_name == "echo":
                targets.append(
                    Target(
                        f"Gateway added time to first token p50 (echo), {protocol}: "
                        "gateway against igora.Client in the same room, the request sent "
                        "by a lean HTTP client",
                        "≤ 3 ms",
                        f"{ms(added['lean'])} ms (httpx: {ms(added['httpx'])} ms)",
                        added["lean"] <= 0.003,
                        19,
                    )
                )
    own = data["echo"]["http_floor_p50"] - data["echo"]["http_floor_lean_p50"]
    body = (
        "Streamed `POST /v1/chat/completions` (one request at a time) through "
        "`igora gateway` → market → broker → worker, against the same streamed chat "
        "through `igora.Client` in the benchmark process (the market without the "
        "gateway's hop) and the engine called directly in the benchmark process; one "
        "market with a protocol 2 room and a protocol 3 room (`--v3-room`), each with its "
        "own gateway, broker and worker. Each request is sent twice: by httpx (the HTTP "
        "client of the openai SDK) and by a lean HTTP/1.1 client (`bench.gateway."
        "LeanHTTP`: the request written as bytes on a keep-alive connection, the response "
        "parsed by httptools, uvicorn's parser). The nine paths are interleaved request "
        "by request. Time to first token = until the first SSE chunk with content (the "
        "first piece for the client); each path timed after a 50 ms pause, so that none "
        "is timed while the benchmark process still reads the end of the path before "
        "it. *Gateway added* = gateway p50 − client p50; *per request* = p50 of each "
        "request's gateway time minus the client time of the same round; *over the "
        "engine* = gateway p50 − direct p50 (the whole market's path). *HTTP hop floor*: "
        "the same request, by the same HTTP client, to a bare ASGI app under uvicorn in "
        "its own process that streams one chunk at once (`bench.gateway.floor`): what "
        "any HTTP proxy's hop costs with that client on this machine at that moment.\n\n"
        "Issue 19's target is judged with the lean client. The reference path, "
        "`igora.Client` over its websocket, has no HTTP client library to pay; httpx "
        f"spent {ms(own)} ms of its own per request here (the difference between the "
        "two floors, echo run), which a user of the openai SDK pays for any HTTP API, a direct "
        "one included, and which is not the gateway's. LiteLLM's published 3.25 ms, "
        "the figure issue 19 cites, compares its proxy with the same client calling "
        "the provider directly, where the client library's cost cancels out.\n\n"
        + table(
            [
                "engine",
                "protocol",
                "HTTP client",
                "requests",
                "direct p50 ms",
                "client p50 ms",
                "client p99 ms",
                "gateway p50 ms",
                "gateway p99 ms",
                "gateway added p50 ms",
                "per request p50 ms",
                "HTTP hop floor p50 ms",
                "over the engine p50 ms",
            ],
            rows,
        )
    )
    return Section("Gateway latency", body, targets, data)
