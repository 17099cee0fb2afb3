"""Gateway latency (issues #4 and #19): time to first token of a streamed OpenAI chat
completion through gateway + market + broker + worker, against the engine called
directly, in a protocol 2 room and in a protocol 3 room."""

from __future__ import annotations

import json
import time

import httpx

from igora.engines.base import Engine

from .common import ENGINE_LABELS, Cluster, Section, Target, ms, pct, table
from .overhead import _prompt, direct_ttft

NAME = "gateway"


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
    """Time to first token of the engine called directly and through a gateway in a
    protocol 2 room and in a protocol 3 room of the same market, the three interleaved."""
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
        out: dict[str, list[float]] = {"direct": [], "v2": [], "v3": []}
        async with httpx.AsyncClient(timeout=120) as http:
            for i in range(warm + n):
                times = {
                    "direct": await direct_ttft(engine, _prompt(i), **opts),
                    "v2": await gateway_ttft(http, base2, model, _prompt(i), **opts),
                    "v3": await gateway_ttft(http, base3, model, _prompt(i), **opts),
                }
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
        data[engine_name] = {"direct_p50": d50, "direct_p99": d99}
        label = ENGINE_LABELS[engine_name]
        for protocol in ("v2", "v3"):
            g50, g99 = pct(r[protocol], 50), pct(r[protocol], 99)
            data[engine_name] |= {f"{protocol}_p50": g50, f"{protocol}_p99": g99}
            rows.append(
                [
                    label,
                    protocol,
                    n,
                    ms(d50),
                    ms(d99),
                    ms(g50),
                    ms(g99),
                    ms(g50 - d50),
                    ms(g99 - d99),
                ]
            )
            if engine_name == "echo":
                targets.append(
                    Target(
                        f"Gateway added time to first token p50 (echo), {protocol}",
                        "≤ 3 ms",
                        f"{ms(g50 - d50)} ms",
                        g50 - d50 <= 0.003,
                        19,
                    )
                )
    body = (
        "Streamed `POST /v1/chat/completions` (httpx, one request at a time) through "
        "`igora gateway` → market → broker → worker, against the engine called directly "
        "in the benchmark process; one market with a protocol 2 room and a protocol 3 room "
        "(`--v3-room`), each with its own gateway, broker and worker; the three paths "
        "interleaved request by request. Time to first token = until the first SSE chunk "
        "with content.\n\n"
        + table(
            [
                "engine",
                "protocol",
                "requests",
                "direct p50 ms",
                "direct p99 ms",
                "gateway p50 ms",
                "gateway p99 ms",
                "added p50 ms",
                "added p99 ms",
            ],
            rows,
        )
    )
    return Section("Gateway latency", body, targets, data)
