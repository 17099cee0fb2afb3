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


async def gateway_ttft(
    http: httpx.AsyncClient, base: str, model: str, prompt: str, **options: object
) -> float:
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": prompt}]}
    body.update(options)
    t0 = time.perf_counter()
    first = None
    async with http.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if first is None and line.startswith("data: {"):
                chunk = json.loads(line[6:])
                choices = chunk.get("choices") or [{}]
                if (choices[0].get("delta") or {}).get("content"):
                    first = time.perf_counter() - t0
    return first if first is not None else time.perf_counter() - t0


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
        out: dict[str, list[float]] = {k: [] for k in ("direct", "floor", "c2", "v2", "c3", "v3")}
        async with httpx.AsyncClient(timeout=120) as http, client2, client3:
            for i in range(warm + n):
                # The client's prompt and the gateway's differ from their first word: a
                # worker's engine caches a prompt's prefix (llama.cpp), and the path asked
                # second would otherwise find the first one's prompt computed.
                ask, via = f"client {_prompt(i)}", f"gateway {_prompt(i)}"
                paths = {  # coroutines: each starts its clock when awaited
                    "direct": direct_ttft(engine, via, **opts),
                    "floor": gateway_ttft(http, base_floor, model, via),
                    "c2": market_ttft(client2, ask, **opts),
                    "v2": gateway_ttft(http, base2, model, via, **opts),
                    "c3": market_ttft(client3, ask, **opts),
                    "v3": gateway_ttft(http, base3, model, via, **opts),
                }
                times = {}
                for key, path in paths.items():
                    await asyncio.sleep(SETTLE)
                    times[key] = await path
                if i >= warm:
                    for k, t in times.items():
                        out[k].append(t)
        await engine.close()
        return out


async def run(quick: bool) -> Section:
    rows = []
    targets = []
    data = {}
    for engine_name, n in (("echo", 50 if quick else 300), ("llama", 8 if quick else 30)):
        r = await measure(engine_name, n)
        d50, d99 = pct(r["direct"], 50), pct(r["direct"], 99)
        f50 = pct(r["floor"], 50)
        data[engine_name] = {"direct_p50": d50, "direct_p99": d99, "http_floor_p50": f50}
        label = ENGINE_LABELS[engine_name]
        for protocol in ("v2", "v3"):
            g50, g99 = pct(r[protocol], 50), pct(r[protocol], 99)
            client = r["c" + protocol[1]]
            c50, c99 = pct(client, 50), pct(client, 99)
            hop = [g - c for g, c in zip(r[protocol], client, strict=True)]
            h50 = pct(hop, 50)
            data[engine_name] |= {
                f"{protocol}_p50": g50,
                f"{protocol}_p99": g99,
                f"{protocol}_client_p50": c50,
                f"{protocol}_client_p99": c99,
                f"{protocol}_hop_p50": h50,
            }
            rows.append(
                [
                    label,
                    protocol,
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
                        "gateway against igora.Client in the same room",
                        "≤ 3 ms",
                        f"{ms(g50 - c50)} ms",
                        g50 - c50 <= 0.003,
                        19,
                    )
                )
    body = (
        "Streamed `POST /v1/chat/completions` (httpx, one request at a time) through "
        "`igora gateway` → market → broker → worker, against the same streamed chat "
        "through `igora.Client` in the benchmark process (the market without the "
        "gateway's hop) and the engine called directly in the benchmark process; one "
        "market with a protocol 2 room and a protocol 3 room (`--v3-room`), each with its "
        "own gateway, broker and worker; the five paths interleaved request by request. "
        "Time to first token = until the first SSE chunk with content (the first piece "
        "for the client); each path timed after a 50 ms pause, so that none is timed while "
        "the benchmark process still reads the end of the path before it. "
        "*Gateway added* = gateway p50 − client p50 (issue 19's target: "
        "the proxy hop); *per request* = p50 of each request's gateway time minus the "
        "client time of the same round; *over the engine* = gateway p50 − direct p50 "
        "(the whole market's path). *HTTP hop floor*: the same httpx request to a bare "
        "ASGI app under uvicorn in its own process that streams one chunk at once "
        "(`bench.gateway.floor`), interleaved too: what any HTTP proxy's hop costs on "
        "this machine at that moment.\n\n"
        + table(
            [
                "engine",
                "protocol",
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
