"""The gateway under load (issue #17): 200 streamed chat completions at once on echo
workers, some read slowly, plus 20 whose HTTP clients disconnect after the first token,
plus a request body of exactly the size limit and one a byte over it.

Every request but the disconnected ones must complete with its whole answer; none may get
a 5xx; every disconnected task must end ``aborted`` (read from the market's archive). The
latency of the completed streams (request sent to ``[DONE]``, and to the first token) is
reported. ``tests/test_gateway_load.py`` runs the same check.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from igora.gateway.app import MAX_BODY, TASK_HEADER

from .common import Cluster, Section, Target, ms, pct, table

NAME = "gateway_load"
STREAMS = 200
GONE = 20
SLOW = 20  # of the STREAMS, read with a pause after each chunk
SLOW_PAUSE = 0.02  # seconds
TOKENS = 20  # pieces of each answer
LONG = 400  # pieces of the answers whose readers go away (long enough to be cut)
DELAY = 0.005  # seconds per piece at the echo workers


@dataclass
class Outcome:
    statuses: Counter[int] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # request to [DONE]
    first_tokens: list[float] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)
    gone_ids: list[str] = field(default_factory=list)
    gone_states: Counter[str] = field(default_factory=Counter)
    limit_status: int = 0  # the body of exactly MAX_BODY bytes
    over_status: int = 0  # one byte more
    seconds: float = 0.0


def expected(n: int) -> str:
    return "".join(f"tok{i} " for i in range(n))


def _body(n: int) -> dict[str, Any]:
    return {
        "model": "echo",
        "stream": True,
        "messages": [{"role": "user", "content": f"#repeat {n}"}],
    }


async def _stream(http: httpx.AsyncClient, base: str, out: Outcome, slow: bool) -> None:
    t0 = time.perf_counter()
    text, first, finished = "", None, False
    async with http.stream("POST", f"{base}/v1/chat/completions", json=_body(TOKENS)) as r:
        out.statuses[r.status_code] += 1
        if r.status_code != 200:
            return
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                finished = True
            elif line.startswith("data: {"):
                choices = json.loads(line[6:]).get("choices") or [{}]
                piece = (choices[0].get("delta") or {}).get("content") or ""
                if piece and first is None:
                    first = time.perf_counter() - t0
                text += piece
                if slow:
                    await asyncio.sleep(SLOW_PAUSE)
    if finished and text == expected(TOKENS) and first is not None:
        out.latencies.append(time.perf_counter() - t0)
        out.first_tokens.append(first)
    else:
        out.incomplete.append(text[-80:])


async def _gone(http: httpx.AsyncClient, base: str, out: Outcome) -> None:
    """Read up to the first token, then close the connection."""
    async with http.stream("POST", f"{base}/v1/chat/completions", json=_body(LONG)) as r:
        out.statuses[r.status_code] += 1
        out.gone_ids.append(r.headers.get(TASK_HEADER, ""))
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                choices = json.loads(line[6:]).get("choices") or [{}]
                if (choices[0].get("delta") or {}).get("content"):
                    break
    # Leaving the block with the body unread closes the connection.


async def _sized(http: httpx.AsyncClient, base: str, size: int) -> int:
    """A request whose body is exactly ``size`` bytes (valid JSON padded with spaces)."""
    raw = json.dumps({**_body(3), "stream": False}).encode()
    body = raw[:-1] + b" " * (size - len(raw)) + b"}"
    r = await http.post(
        f"{base}/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    return r.status_code


def archived_state(market_port: int, task_id: str) -> str | None:
    url = f"http://127.0.0.1:{market_port}/rooms/market/tasks/{task_id}"
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return str(json.loads(r.read()).get("state"))
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


async def hammer(base: str, market_port: int) -> Outcome:
    """Run the load against a gateway on ``base`` (workers serving ``echo``)."""
    out = Outcome()
    limits = httpx.Limits(max_connections=STREAMS + GONE + 2, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        started = time.perf_counter()
        jobs = [_stream(http, base, out, slow=i < SLOW) for i in range(STREAMS)]
        jobs += [_gone(http, base, out) for _ in range(GONE)]
        await asyncio.gather(*jobs)
        out.seconds = time.perf_counter() - started
        out.limit_status = await _sized(http, base, MAX_BODY)
        out.over_status = await _sized(http, base, MAX_BODY + 1)
    # Every disconnected task ends, aborted, in the market's archive.
    end = time.monotonic() + 30
    pending = set(out.gone_ids)
    while pending and time.monotonic() < end:
        for tid in list(pending):
            state = await asyncio.to_thread(archived_state, market_port, tid)
            if state is not None:
                out.gone_states[state] += 1
                pending.discard(tid)
        await asyncio.sleep(0.2)
    if pending:
        out.gone_states["not ended"] += len(pending)
    return out


def good(out: Outcome) -> bool:
    return (
        len(out.latencies) == STREAMS
        and not out.incomplete
        and out.statuses == Counter({200: STREAMS + GONE})
        and out.gone_states == Counter({"aborted": GONE})
        and out.limit_status == 200
        and out.over_status == 413
    )


async def measure() -> Outcome:
    with Cluster("gateway-load") as c:
        c.market()
        c.broker("--heartbeat", "1")
        for name in ("w1", "w2"):
            c.worker("--slots", "16", "--delay", str(DELAY), name=name)
        _, base = c.gateway("--log-level", "warning", "--wait-worker", "30")
        await c.wait_agents_async("worker", 2, timeout=120)
        return await hammer(base, c.port)


async def run(quick: bool) -> Section:
    out = await measure()
    lat, ttft = out.latencies, out.first_tokens
    body = (
        f"{STREAMS} streamed `POST /v1/chat/completions` sent at once (httpx, one connection "
        f"each), answers of {TOKENS} pieces from two echo workers (16 slots each, "
        f"{DELAY * 1000:g} ms per piece), {SLOW} of them read with a {SLOW_PAUSE * 1000:g} ms "
        f"pause after each chunk; with them {GONE} requests whose client disconnects after "
        f"the first token (answers of {LONG} pieces). Then one request whose body is exactly "
        f"the limit ({MAX_BODY:,} bytes) and one a byte over.\n\n"
        + table(
            ["", "p50 (ms)", "p99 (ms)", "max (ms)"],
            [
                [
                    "request to [DONE]",
                    ms(pct(lat, 50)),
                    ms(pct(lat, 99)),
                    ms(max(lat, default=float("nan"))),
                ],
                [
                    "request to first token",
                    ms(pct(ttft, 50)),
                    ms(pct(ttft, 99)),
                    ms(max(ttft, default=float("nan"))),
                ],
            ],
        )
        + f"\n\nAll {STREAMS + GONE} in {out.seconds:.2f} s; HTTP statuses "
        f"{dict(out.statuses)}; completed with the whole answer: {len(lat)}/{STREAMS}; "
        f"disconnected tasks in the archive: {dict(out.gone_states)}; body at the limit: "
        f"{out.limit_status}, a byte over: {out.over_status}.\n"
    )
    return Section(
        "Gateway under load",
        body,
        [
            Target(
                f"Gateway: {STREAMS} streams at once + {GONE} disconnects: no 5xx, all "
                "complete, each disconnect aborts its task",
                "all",
                f"{len(lat)}/{STREAMS} complete, "
                f"{out.gone_states.get('aborted', 0)}/{GONE} aborted, "
                f"{sum(v for k, v in out.statuses.items() if k >= 500)} 5xx",
                good(out),
            )
        ],
        {
            "p50": pct(lat, 50),
            "p99": pct(lat, 99),
            "ttft_p50": pct(ttft, 50),
            "ttft_p99": pct(ttft, 99),
            "statuses": dict(out.statuses),
            "gone": dict(out.gone_states),
            "limit": out.limit_status,
            "over": out.over_status,
        },
    )
