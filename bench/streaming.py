"""Streaming throughput (issue #8): tokens/s of the bundled model through the market
against the same llama.cpp engine called directly, same prompt, same settings, in the
same run (interleaved), and their ratio."""

from __future__ import annotations

import time

from igora import Client
from igora.engines.base import Finish, Request
from igora.engines.llama import LlamaEngine, bundled_model

from .common import Cluster, Section, Target, table

NAME = "streaming"
PROMPT = "Write a long story about a cat who travels around the world."


async def direct(engine: LlamaEngine, max_tokens: int) -> tuple[int, float, float]:
    """Tokens, seconds from the call to the last token, seconds from first to last token."""
    t0 = time.perf_counter()
    first = last = t0
    n = 0
    async for item in engine.generate(
        Request(
            [{"role": "user", "content": PROMPT}], max_tokens=max_tokens, temperature=0.0, seed=1
        )
    ):
        if isinstance(item, str):
            last = time.perf_counter()
            if n == 0:
                first = last
            n += 1
        elif isinstance(item, Finish):
            n = item.completion_tokens or n
    return n, last - t0, last - first


async def market(client: Client, max_tokens: int) -> tuple[int, float, float]:
    t0 = time.perf_counter()
    first = last = t0
    task = await client.submit(PROMPT, max_tokens=max_tokens, temperature=0.0, seed=1)
    got = False
    async for _piece in task.stream():
        last = time.perf_counter()
        if not got:
            first, got = last, True
    usage = (task.final or {}).get("usage") or {}
    return int(usage.get("completionTokens") or 0), last - t0, last - first


async def run(quick: bool) -> Section:
    reps = 2 if quick else 5
    max_tokens = 96 if quick else 256
    d_runs, m_runs = [], []
    with Cluster("streaming") as c:
        c.market()
        c.broker()
        c.worker(engine="llama")
        engine = LlamaEngine(bundled_model())
        await c.wait_agents_async("worker", 1, timeout=180)
        await c.wait_agents_async("broker", 1, timeout=120)
        async with Client(c.url, name="bench-streaming") as client:
            await client.wait_for_worker(None, 60)
            await direct(engine, 16)
            await market(client, 16)
            for _ in range(reps):
                d_runs.append(await direct(engine, max_tokens))
                m_runs.append(await market(client, max_tokens))
        await engine.close()
    d_tok = sum(r[0] for r in d_runs)
    m_tok = sum(r[0] for r in m_runs)
    d_rate, m_rate = d_tok / sum(r[1] for r in d_runs), m_tok / sum(r[1] for r in m_runs)
    d_dec = sum(r[0] - 1 for r in d_runs) / sum(r[2] for r in d_runs)
    m_dec = sum(r[0] - 1 for r in m_runs) / sum(r[2] for r in m_runs)
    ratio = m_rate / d_rate
    rows = [
        ["llama.cpp directly (in the benchmark process)", d_tok, f"{d_rate:.1f}", f"{d_dec:.1f}"],
        ["through client → market → broker → worker", m_tok, f"{m_rate:.1f}", f"{m_dec:.1f}"],
        ["ratio market / direct", "", f"{ratio:.3f}", f"{m_dec / d_dec:.3f}"],
    ]
    body = (
        f"Bundled SmolLM2-135M-Instruct (Q4_1), llama-cpp-python defaults (threads), "
        f"{reps} answers of up to {max_tokens} tokens each way, temperature 0, seed 1, "
        "interleaved. tokens/s = tokens ÷ time from the request to the last token in hand; "
        "decode tokens/s = from the first to the last token.\n\n"
        + table(["path", "tokens", "tokens/s", "decode tokens/s"], rows)
    )
    target = Target(
        "Streaming throughput, market ÷ direct llama.cpp",
        "≥ 0.97",
        f"{ratio:.3f} ({m_rate:.1f} vs {d_rate:.1f} tokens/s)",
        ratio >= 0.97,
    )
    return Section(
        "Streaming throughput", body, [target], {"direct": d_rate, "market": m_rate, "ratio": ratio}
    )
