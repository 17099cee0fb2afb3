"""Market overhead on time to first token (issue #8).

The same prompts are answered twice in the same run: directly by the engine, in this
process, and through client -> market -> broker -> worker (three processes on loopback).
The overhead is the difference of the two time-to-first-token distributions, for the
deterministic zero-latency echo engine and for the real bundled model.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from igora import Client
from igora.engines.base import Engine, Request

from .common import ENGINE_LABELS, Cluster, Section, Target, ms, pct, table

NAME = "overhead"
PROMPT_WORDS = ["bonjour", "le", "marché", "des", "modèles", "ouverts"]


async def interleaved(
    reference: Callable[[int], Awaitable[float]],
    measured: Callable[[int], Awaitable[float]],
    n: int,
    warm: int = 3,
) -> tuple[list[float], list[float]]:
    """Time both paths ``n`` times, alternating so that drifts hit both alike, after
    ``warm`` untimed rounds (imports, first allocations, llama.cpp graph)."""
    for i in range(warm):
        await reference(i)
        await measured(i)
    a: list[float] = []
    b: list[float] = []
    for i in range(n):
        a.append(await reference(i))
        b.append(await measured(i))
    return a, b


def _prompt(i: int) -> str:
    return " ".join(PROMPT_WORDS[: 1 + i % len(PROMPT_WORDS)]) + f" {i}"


async def direct_ttft(engine: Engine, prompt: str, **options: object) -> float:
    start = time.perf_counter()
    gen = engine.generate(Request([{"role": "user", "content": prompt}], **options))  # type: ignore[arg-type]
    try:
        async for item in gen:
            if isinstance(item, str):
                return time.perf_counter() - start
    finally:
        await gen.aclose()
    return time.perf_counter() - start


async def market_ttft(client: Client, prompt: str, **options: object) -> float:
    start = time.perf_counter()
    first = None
    async for piece in await client.chat(prompt, stream=True, **options):
        if first is None and piece:
            first = time.perf_counter() - start
    return first if first is not None else time.perf_counter() - start


async def measure(
    engine_name: str, n: int, llama_opts: dict[str, object]
) -> dict[str, list[float]]:
    with Cluster(f"overhead-{engine_name}") as c:
        c.market()
        c.broker("--heartbeat", "1")
        if engine_name == "echo":
            from igora.engines.echo import EchoEngine

            c.worker(engine="echo")
            engine: Engine = EchoEngine()
        else:
            from igora.engines.llama import LlamaEngine, bundled_model

            c.worker(engine="llama")
            engine = LlamaEngine(bundled_model())
        await c.wait_agents_async("worker", 1, timeout=180)
        await c.wait_agents_async("broker", 1, timeout=120)
        async with Client(c.url, name="bench-overhead") as client:
            await client.wait_for_worker(None, 30)
            direct, market = await interleaved(
                lambda i: direct_ttft(engine, _prompt(i), **llama_opts),
                lambda i: market_ttft(client, _prompt(i), **llama_opts),
                n,
            )
        await engine.close()
        return {"direct": direct, "market": market}


async def run(quick: bool) -> Section:
    rows = []
    targets = []
    data = {}
    for engine_name, n in (("echo", 60 if quick else 400), ("llama", 8 if quick else 40)):
        opts: dict[str, object] = (
            {"max_tokens": 4, "temperature": 0.0, "seed": 1} if engine_name == "llama" else {}
        )
        r = await measure(engine_name, n, opts)
        d50, d99 = pct(r["direct"], 50), pct(r["direct"], 99)
        m50, m99 = pct(r["market"], 50), pct(r["market"], 99)
        o50, o99 = m50 - d50, m99 - d99
        data[engine_name] = {
            "direct_p50": d50,
            "direct_p99": d99,
            "market_p50": m50,
            "market_p99": m99,
            "n": n,
        }
        label = ENGINE_LABELS[engine_name]
        rows.append([label, n, ms(d50), ms(d99), ms(m50), ms(m99), ms(o50), ms(o99)])
        if engine_name == "echo":
            targets.append(
                Target("TTFT overhead p50 (echo)", "≤ 5 ms", f"{o50 * 1000:.2f} ms", o50 <= 0.005)
            )
            targets.append(
                Target("TTFT overhead p99 (echo)", "≤ 25 ms", f"{o99 * 1000:.2f} ms", o99 <= 0.025)
            )
        else:
            targets.append(
                Target(
                    "TTFT overhead p50 (llama.cpp)", "≤ 5 ms", f"{o50 * 1000:.2f} ms", o50 <= 0.005
                )
            )
            targets.append(
                Target(
                    "TTFT overhead p99 (llama.cpp)", "≤ 25 ms", f"{o99 * 1000:.2f} ms", o99 <= 0.025
                )
            )
    body = (
        "Sequential prompts, one at a time, interleaved: the engine called directly in the "
        "benchmark process, then the same prompt through a `Client` → market → broker → "
        "worker (separate processes on 127.0.0.1, market with its SQLite store). Time to "
        "first token = from the call to the first text piece in hand. Overhead = market − "
        "direct at the same percentile. llama.cpp prompts ask for 4 tokens at temperature "
        "0.\n\n"
        + table(
            [
                "engine",
                "prompts",
                "direct p50 ms",
                "direct p99 ms",
                "market p50 ms",
                "market p99 ms",
                "overhead p50 ms",
                "overhead p99 ms",
            ],
            rows,
        )
    )
    return Section("Market overhead on time to first token", body, targets, data)
