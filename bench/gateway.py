"""Gateway latency (issue #4): time to first token of a streamed OpenAI chat completion
through gateway + market + broker + worker, against the engine called directly."""

from __future__ import annotations

import json
import time

import httpx

from igora.engines.base import Engine

from .common import ENGINE_LABELS, Cluster, Section, ms, pct, table
from .overhead import _prompt, direct_ttft, interleaved

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


async def measure(engine_name: str, n: int) -> dict[str, list[float]]:
    with Cluster(f"gateway-{engine_name}") as c:
        c.market()
        c.broker("--heartbeat", "1")
        if engine_name == "echo":
            from igora.engines.echo import EchoEngine

            c.worker(engine="echo")
            engine: Engine = EchoEngine()
            model, opts = "echo", {}
        else:
            from igora.engines.llama import LlamaEngine, bundled_model

            c.worker(engine="llama")
            engine = LlamaEngine(bundled_model())
            model = engine.models()[0].name
            opts = {"max_tokens": 4, "temperature": 0.0, "seed": 1}
        _, base = c.gateway("--log-level", "warning", "--wait-worker", "30")
        await c.wait_agents_async("worker", 1, timeout=180)
        async with httpx.AsyncClient(timeout=120) as http:
            direct, via = await interleaved(
                lambda i: direct_ttft(engine, _prompt(i), **opts),
                lambda i: gateway_ttft(http, base, model, _prompt(i), **opts),
                n,
            )
        await engine.close()
        return {"direct": direct, "gateway": via}


async def run(quick: bool) -> Section:
    rows = []
    targets = []
    data = {}
    for engine_name, n in (("echo", 50 if quick else 300), ("llama", 8 if quick else 30)):
        r = await measure(engine_name, n)
        d50, d99 = pct(r["direct"], 50), pct(r["direct"], 99)
        g50, g99 = pct(r["gateway"], 50), pct(r["gateway"], 99)
        data[engine_name] = {
            "direct_p50": d50,
            "direct_p99": d99,
            "gateway_p50": g50,
            "gateway_p99": g99,
        }
        label = ENGINE_LABELS[engine_name]
        rows.append([label, n, ms(d50), ms(d99), ms(g50), ms(g99), ms(g50 - d50), ms(g99 - d99)])
    body = (
        "Streamed `POST /v1/chat/completions` (httpx, one request at a time) through "
        "`igora gateway` → market → broker → worker, against the engine called directly "
        "in the benchmark process, interleaved. Time to first token = until the first SSE "
        "chunk with content.\n\n"
        + table(
            [
                "engine",
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
