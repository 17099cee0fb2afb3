"""Wire cost of streaming (issues #3 and #8): bytes on the websocket for one answer of N
tokens, N = 100, 1,000, 4,000, and the linear fit.

The worker and the client connect through counting TCP proxies, so every byte is
counted as it is on the wire (websocket framing, masking and compression included).
The echo worker waits ``DELAY`` s per token, so each token is its own Yjs transaction
and its own websocket message (the worst case: a fast engine gets pieces batched).
"""

from __future__ import annotations

import asyncio
import time

from igora import Client

from .common import Cluster, Section, Target, table
from .proxy import CountingProxy

NAME = "wire"
DELAY = 0.002


def fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least squares ``y = a + b x``; returns a, b and the largest relative residual."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )
    a = my - b * mx
    worst = max(abs(a + b * x - y) / y for x, y in zip(xs, ys, strict=True))
    return a, b, worst


def text_len(n: int) -> int:
    return sum(len(f"tok{i} ") for i in range(n))


async def measure(sizes: list[int]) -> list[dict[str, float]]:
    out = []
    with Cluster("wire") as c:
        c.market()
        c.broker("--heartbeat", "30")
        async with CountingProxy(c.port) as wp, CountingProxy(c.port) as cp:
            c.worker("--delay", str(DELAY), "--heartbeat", "30", "--market", wp.url)
            await c.wait_agents_async("worker", 1, timeout=120)
            await c.wait_agents_async("broker", 1, timeout=120)
            async with Client(cp.url, name="bench-wire") as client:
                await client.wait_for_worker(None, 30)
                await client.chat("#repeat 10")  # warm-up
                for n in sizes:
                    await asyncio.sleep(0.3)
                    up0, down0, cup0 = wp.up, cp.down, cp.up
                    t0 = time.perf_counter()
                    pieces = [
                        p
                        async for p in await client.chat(f"#repeat {n}", stream=True, max_tokens=n)
                    ]
                    elapsed = time.perf_counter() - t0
                    await asyncio.sleep(0.3)  # the last frames (done, deletion) arrive
                    assert "".join(pieces) == "".join(f"tok{i} " for i in range(n))
                    out.append(
                        {
                            "tokens": n,
                            "text": text_len(n),
                            "worker_up": wp.up - up0,
                            "client_down": cp.down - down0,
                            "client_up": cp.up - cup0,
                            "pieces": len(pieces),
                            "seconds": elapsed,
                        }
                    )
    return out


async def run(quick: bool) -> Section:
    sizes = [100, 1000] if quick else [100, 1000, 4000]
    rows_data = await measure(sizes)
    rows = []
    for r in rows_data:
        n = r["tokens"]
        rows.append(
            [
                int(n),
                int(r["text"]),
                int(r["worker_up"]),
                f"{r['worker_up'] / n:.1f}",
                int(r["client_down"]),
                f"{r['client_down'] / n:.1f}",
                f"{r['client_down'] / r['text']:.2f}",
                int(r["pieces"]),
            ]
        )
    xs = [r["tokens"] for r in rows_data]
    a_up, b_up, res_up = fit(xs, [r["worker_up"] for r in rows_data])
    a_dn, b_dn, res_dn = fit(xs, [r["client_down"] for r in rows_data])
    chars = rows_data[-1]["text"] / rows_data[-1]["tokens"]
    body = (
        f"Echo worker, one token every {DELAY * 1000:g} ms (each token its own transaction "
        "and message); bytes counted by TCP proxies in front of the worker (worker → "
        "market) and the client (market → client), during one answer (from the request to "
        "the task leaving `done`).\n\n"
        + table(
            [
                "tokens",
                "text bytes",
                "worker → market bytes",
                "per token",
                "market → client bytes",
                "per token",
                "× text",
                "pieces received",
            ],
            rows,
        )
        + f"\n\nLinear fit, worker → market: {a_up:.0f} + {b_up:.1f} × tokens bytes (largest "
        f"deviation {res_up * 100:.1f} %); market → client: {a_dn:.0f} + {b_dn:.1f} × tokens "
        f"(largest deviation {res_dn * 100:.1f} %). Average token text: {chars:.2f} bytes; "
        f"the original protocol's whole-task rewrite at every token would send about "
        f"{sum(text_len(k) for k in range(1, sizes[-1] + 1)) / 1e6:.0f} MB for "
        f"{sizes[-1]} tokens (the sum of the prefixes' lengths alone)."
    )
    worst = max(b_up, b_dn)
    target = Target(
        "Bytes per streamed token",
        f"≤ 3 × token text + constant (≤ {3 * chars:.1f})",
        f"{b_dn:.1f} B/token to the client, {b_up:.1f} from the worker "
        f"({worst / chars:.2f} × text)",
        worst <= 3 * chars,
    )
    first, last = rows_data[0], rows_data[-1]
    growth = (last["client_down"] / last["tokens"]) / (first["client_down"] / first["tokens"])
    linear = Target(
        f"Answer bytes grow linearly ({sizes[0]} → {sizes[-1]:,} tokens)",
        "bytes/token does not grow with length",
        f"bytes/token at {sizes[-1]:,} ÷ at {sizes[0]}: {growth:.2f}",
        growth <= 1.1,
    )
    return Section(
        "Wire cost of a streamed answer",
        body,
        [target, linear],
        {"rows": rows_data, "fit_up": [a_up, b_up], "fit_down": [a_dn, b_dn]},
    )
