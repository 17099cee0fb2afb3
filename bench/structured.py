"""Structured output and embedding throughput (issue #14): what grammar-constrained JSON,
forced tool calls and embeddings cost on the bundled model, through gateway + market +
broker + one llama.cpp worker, next to plain text answers measured the same way."""

from __future__ import annotations

import time
from typing import Any

import httpx

from .common import Cluster, Section, table

NAME = "structured"

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "city": {"type": "string"},
    },
    "required": ["name", "age", "city"],
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
PROMPT = "Tom is a 31 year old baker from Lyon. {}"
KINDS: dict[str, dict[str, Any]] = {
    "plain text": {},
    "json_object": {"response_format": {"type": "json_object"}},
    "json_schema": {
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON},
        }
    },
    "forced tool call": {
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    },
}


async def chat(
    http: httpx.AsyncClient, base: str, i: int, options: dict[str, Any]
) -> tuple[float, int]:
    body = {
        "messages": [{"role": "user", "content": PROMPT.format(f"(request {i})")}],
        "max_tokens": 96,
        "temperature": 0.0,
        "seed": i,
        **options,
    }
    t0 = time.perf_counter()
    r = await http.post(f"{base}/v1/chat/completions", json=body)
    r.raise_for_status()
    return time.perf_counter() - t0, int(r.json()["usage"]["completion_tokens"])


async def run(quick: bool) -> Section:
    n = 4 if quick else 12
    batches = (1, 16) if quick else (1, 16, 64)
    rows, data = [], {}
    with Cluster("structured") as c:
        c.market()
        c.broker("--heartbeat", "1")
        c.worker(engine="llama")
        _, base = c.gateway("--log-level", "warning", "--wait-worker", "30")
        await c.wait_agents_async("worker", 1, timeout=180)
        async with httpx.AsyncClient(timeout=300) as http:
            await chat(http, base, -1, {})  # warm-up
            totals = {kind: [0.0, 0] for kind in KINDS}
            for i in range(n):  # interleaved: a change of the machine's load hits all kinds
                for kind, options in KINDS.items():
                    s, t = await chat(http, base, i, options)
                    totals[kind][0] += s
                    totals[kind][1] += t
            for kind, (seconds, tokens) in totals.items():
                data[kind] = {"requests": n, "seconds": seconds, "tokens": tokens}
                rows.append(
                    [
                        kind,
                        n,
                        f"{seconds / n * 1000:.0f}",
                        f"{tokens / n:.1f}",
                        f"{tokens / seconds:.1f}",
                    ]
                )
            embed_rows = []
            await http.post(f"{base}/v1/embeddings", json={"input": "warm-up"})  # loads it
            for size in batches:
                texts = [f"Sentence number {i} about cats, markets and bread." for i in range(size)]
                t0 = time.perf_counter()
                r = await http.post(f"{base}/v1/embeddings", json={"input": texts})
                r.raise_for_status()
                seconds = time.perf_counter() - t0
                dims = len(r.json()["data"][0]["embedding"])
                data[f"embed {size}"] = {"seconds": seconds, "dimensions": dims}
                embed_rows.append([size, dims, f"{seconds * 1000:.0f}", f"{size / seconds:.1f}"])
    body = (
        "One llama.cpp worker (1 slot, bundled SmolLM2-135M), requests one at a time through "
        "`igora gateway`, the four kinds interleaved "
        "(non-streaming, `max_tokens` 96, temperature 0). Tokens/s counts "
        "completion tokens over the whole request time (gateway and market included). "
        'JSON answers are sampled under a grammar (docs/gateway.md, "Structured answers"); '
        "a forced tool call is a grammar over the tool's parameters.\n\n"
        + table(["answer", "requests", "mean ms / request", "tokens / answer", "tokens/s"], rows)
        + "\n\nEmbeddings (`POST /v1/embeddings`, one request per batch; the first request "
        "loaded the embedding instance):\n\n"
        + table(["texts per request", "dimensions", "ms / request", "texts/s"], embed_rows)
    )
    return Section("Structured output and embeddings", body, [], data)
