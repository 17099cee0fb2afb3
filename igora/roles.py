"""The long-running roles and one-shot commands behind the CLI."""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
from typing import Any

from .agent import Agent
from .broker.broker import Broker
from .client import Client, Restart
from .config import MarketAddress
from .engines.base import Engine, EngineError, Request
from .market.summary import tasks_by_state
from .protocol import BROKER_STYLE, TEXT_STYLE, A, AgentType
from .worker.worker import Worker


def make_engine(args: argparse.Namespace) -> Engine:
    models = args.model or []
    if args.engine == "echo":
        from .engines.echo import EchoEngine

        return EchoEngine(models[0] if models else "echo", delay=args.delay)
    if args.engine == "openai":
        from .engines.openai import OpenAIEngine

        if not args.base_url:
            raise EngineError("--engine openai needs --base-url (e.g. http://127.0.0.1:8000/v1)")
        if not models:
            raise EngineError("--engine openai needs at least one --model NAME[=ALIAS]")
        return OpenAIEngine(args.base_url, models, api_key=args.api_key,
                            timeout=getattr(args, "upstream_timeout", None) or 300.0)
    from .engines.llama import LlamaEngine, llama_class, resolve_model

    if len(models) > 1:
        raise EngineError("--engine llama serves one GGUF file per worker: give one --model")
    llama_class()  # installed, and runs on this CPU: say so before looking for a model
    path = resolve_model(models[0] if models else None)
    embedding = getattr(args, "embedding_model", None)
    embedding_path = resolve_model(embedding) if embedding else None
    print(f"loading {path.name} ...", file=sys.stderr, flush=True)
    return LlamaEngine(path, context_length=args.context, slots=args.slots, threads=args.threads,
                       embedding_model=embedding_path)


async def warmup(worker: Worker) -> None:
    """Measure the engine's speed on a tiny request so the market sees it at once."""
    engine = worker.engine
    start = time.monotonic()
    n = 0
    try:
        async for item in engine.generate(Request([{"role": "user", "content": "Hi"}],
                                                  max_tokens=8, temperature=0.0)):
            if isinstance(item, str):
                n += 1
    except EngineError as exc:
        worker.agent.log.warning("warm-up failed: %s", exc)
        return
    elapsed = time.monotonic() - start
    if n and elapsed > 0:
        worker.speed = n / elapsed


async def run_worker(address: MarketAddress, args: argparse.Namespace) -> int:
    engine = await asyncio.to_thread(make_engine, args)
    name = args.name or f"worker-{socket.gethostname()}"
    agent = Agent(address, type=AgentType.WORKER.value, name=name, style=TEXT_STYLE,
                  heartbeat=args.heartbeat, state="busy")
    worker = Worker(agent, engine, slots=args.slots, max_tokens=args.max_tokens)
    if not args.no_warmup and args.engine != "echo":
        await warmup(worker)
    await agent.start(wait=False)
    agent.log.info("%s serving %s with %s, %d slot(s), on %s", name,
                   ", ".join(m.name for m in engine.models()), engine.kind, worker.slots,
                   address.room_url)
    try:
        await worker.run()
    finally:
        await agent.stop()
        await engine.close()
    return 0


async def run_broker(address: MarketAddress, args: argparse.Namespace) -> int:
    agent = Agent(address, type=AgentType.BROKER.value, name=args.name, style=BROKER_STYLE,
                  heartbeat=args.heartbeat)
    broker = Broker(agent, grace=args.grace, max_attempts=args.max_attempts,
                    task_timeout=args.task_timeout, retention=args.retention,
                    claim_timeout=args.claim_timeout)
    await agent.start(wait=False)
    agent.log.info("%s watching %s", args.name, address.room_url)
    try:
        await broker.run()
    finally:
        await agent.stop()
    return 0


async def chat(address: MarketAddress, args: argparse.Namespace) -> int:
    async with Client(address.url, address.room, name="igora-chat", timeout=args.timeout) as c:
        options: dict[str, Any] = {"model": args.model, "system": args.system,
                                   "temperature": args.temperature, "seed": args.seed,
                                   "max_tokens": args.max_tokens, "wait_worker": 10.0}
        if args.no_stream:
            print(await c.chat(args.prompt, **options))
            return 0
        async for piece in await c.chat(args.prompt, stream=True, **options):
            if isinstance(piece, Restart):
                sys.stdout.write("\n" + piece.strip() + "\n")
            else:
                sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


def market_view(agent: Agent) -> dict[str, Any]:
    """Agents and tasks of a room, as plain data (for ``status`` and the web page)."""
    agents = []
    for p in agent.peers():
        s = p.state
        agents.append({
            "id": p.id, "name": p.name, "type": p.type, "state": s.get(A.STATE),
            "models": p.models, "slots": s.get(A.SLOTS), "running": s.get(A.RUNNING),
            "speed": s.get(A.SPEED), "engine": s.get(A.ENGINE), "leader": s.get(A.LEADER),
        })
    return {"agents": agents, "tasks": tasks_by_state(agent.maps)}


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


async def status(address: MarketAddress, args: argparse.Namespace) -> int:
    agent = Agent(address, type=AgentType.CLIENT.value, name="igora-status", style=TEXT_STYLE)
    async with agent:
        await asyncio.sleep(0.3)  # let awareness states arrive
        view = market_view(agent)
    if args.json:
        print(json.dumps(view, indent=2))
        return 0
    rows = [["TYPE", "NAME", "STATE", "MODELS", "SLOTS", "SPEED"]]
    for a in sorted(view["agents"], key=lambda a: (str(a["type"]), str(a["name"]))):
        slots = f"{a['running'] or 0}/{a['slots']}" if a["type"] == "worker" else ""
        speed = f"{a['speed']} tok/s" if a.get("speed") else ""
        state = str(a["state"] or "") + (" (active)" if a.get("leader") else "")
        rows.append([str(a["type"]), str(a["name"]), state, ", ".join(a["models"]), slots, speed])
    print(f"market {address.room_url}")
    print(_table(rows) if len(rows) > 1 else "no agents")
    print()
    print(_table([list(view["tasks"].keys()), [str(v) for v in view["tasks"].values()]]))
    return 0
