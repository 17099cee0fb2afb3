"""The long-running roles and one-shot commands behind the CLI, each from typed settings
(the CLI turns its flags into them; nothing below it reads an ``argparse.Namespace``)."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from .agent import DEFAULT_HEARTBEAT, Agent
from .broker.broker import Broker
from .client import DEFAULT_TIMEOUT, Client, Restart
from .config import MarketAddress
from .protocol import BROKER_STYLE, TEXT_STYLE, AgentType
from .serving import WorkerSpec, serve
from .summary import agent_order, agent_summary, tasks_by_state
from .v3 import roles as v3_roles
from .v3 import view as room_view
from .v3.session import room_protocol, room_speaks_v3

__all__ = ["chat", "market_view", "run_broker", "run_worker", "status"]

CHAT_WAIT_WORKER = 10.0
"""Seconds ``igora chat`` waits for a worker serving its model to appear."""
STATUS_SETTLE = 0.3
"""Seconds ``igora status`` waits after joining for the agents' awareness states."""


async def run_worker(spec: WorkerSpec) -> int:
    """``igora worker``: one worker on the market until interrupted."""
    return await serve([spec])


async def run_broker(
    address: MarketAddress, *, name: str, heartbeat: float = DEFAULT_HEARTBEAT, **settings: Any
) -> int:
    """``igora broker``: ``settings`` are ``Broker``'s (grace, max_attempts, ...). In a
    room that speaks version 3, the v3 broker (``igora.v3.roles``)."""
    if await room_protocol(address, name):
        return await v3_roles.run_broker(address, name=name, heartbeat=heartbeat, **settings)
    agent = Agent(
        address, type=AgentType.BROKER.value, name=name, style=BROKER_STYLE, heartbeat=heartbeat
    )
    broker = Broker(agent, **settings)
    await agent.start(wait=False)
    agent.log.info("%s watching %s", name, address.room_url)
    try:
        await broker.run()
    finally:
        await agent.stop()
    return 0


async def chat(
    address: MarketAddress,
    prompt: str,
    *,
    stream: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    trust_workers: list[str] | None = None,
    **options: Any,
) -> int:
    """``igora chat``: print the answer as it streams in. ``options``: ``Client.chat``'s
    (model, system, temperature, seed, max_tokens)."""
    async with Client(
        address.url,
        address.room,
        name="igora-chat",
        timeout=timeout,
        invite=address.invite,
        trust_workers=trust_workers,
    ) as c:
        options = {"wait_worker": CHAT_WAIT_WORKER, **options}
        if not stream:
            print(await c.chat(prompt, **options))
            return 0
        async for piece in await c.chat(prompt, stream=True, **options):
            if isinstance(piece, Restart):
                sys.stdout.write("\n" + piece.strip() + "\n")
            else:
                sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


def market_view(agent: Agent) -> dict[str, Any]:
    """Agents and task counts by state of a room, as plain data (``igora status``)."""
    agents = sorted(
        (agent_summary(p.state, str(p.client_id)) for p in agent.peers()), key=agent_order
    )
    return {"agents": agents, "tasks": tasks_by_state(agent.maps)}


async def _status_v3(address: MarketAddress, as_json: bool, invite: str | None) -> int:
    """``igora status`` of a v3 room: the market's view of it (``igora.v3.view``)."""
    snap = room_view.snapshot(await room_view.read(address, invite=invite))
    recent = [t for g in room_view.GROUPS for t in snap["tasks"][g]]
    if as_json:
        out = {k: snap[k] for k in ("agents", "broker", "counts", "models", "perMinute")}
        print(json.dumps({**out, "protocol": 3, "tasks": recent}, indent=2))
        return 0
    rows = [["TYPE", "NAME", "KEY", "STATE", "MODELS", "SLOTS"]]
    for a in snap["agents"]:
        slots = f"{a['running'] or 0}/{a['slots']}" if a["slots"] is not None else ""
        state = (str(a["state"] or "") + (" (active)" if a.get("leader") else "")).strip()
        models = ", ".join(m["name"] for m in a["models"])
        rows.append([str(a["type"]), str(a["name"]), a["key"], state, models, slots])
    print(f"market {address.room_url} (protocol 3)")
    print(_table(rows) if len(rows) > 1 else "no agents")
    print()
    if snap["board"] is None:
        print("no board yet: no broker holds the lease, or it has not written one")
        return 0
    counts = snap["counts"]
    print(_table([list(counts), [str(v) for v in counts.values()]]))
    per_minute = snap["perMinute"]
    print(f"last minute: {per_minute['done']} done, {per_minute['tokens']} tokens")
    if recent:
        print()
        rows = [["TASK", "MODEL", "STATE", "WORKER", "TOKENS", "SECONDS"]]
        for t in sorted(recent, key=lambda t: -(t["end"] or t["date"] or 0)):
            seconds = f"{t['duration'] / 1000:.2f}" if t["duration"] is not None else ""
            tokens = str(t["tokens"]) if t["tokens"] is not None else ""
            rows.append(
                [str(t["id"]), str(t["model"]), t["state"], t["worker"] or "", tokens, seconds]
            )
        print(_table(rows))
    return 0


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


async def status(
    address: MarketAddress, *, as_json: bool = False, invite: str | None = None
) -> int:
    """``igora status``: the agents and the tasks by state, as a table or JSON;
    ``invite`` joins a market that shows its rooms to members only."""
    if await room_speaks_v3(address, 0):
        return await _status_v3(address, as_json, invite)
    agent = Agent(address, type=AgentType.CLIENT.value, name="igora-status", style=TEXT_STYLE)
    async with agent:
        await asyncio.sleep(STATUS_SETTLE)  # let awareness states arrive
        view = market_view(agent)
    if as_json:
        print(json.dumps(view, indent=2))
        return 0
    rows = [["TYPE", "NAME", "STATE", "MODELS", "SLOTS", "SPEED"]]
    for a in view["agents"]:
        slots = f"{a['running'] or 0}/{a['slots']}" if a["type"] == "worker" else ""
        speed = f"{a['speed']:g} tok/s" if a.get("speed") else ""
        state = str(a["state"] or "") + (" (active)" if a.get("leader") else "")
        models = ", ".join(m["name"] for m in a["models"])
        rows.append([str(a["type"]), str(a["name"]), state, models, slots, speed])
    print(f"market {address.room_url}")
    print(_table(rows) if len(rows) > 1 else "no agents")
    print()
    print("tasks in the room now, by state (an answered task leaves once its client read it):")
    print(_table([list(view["tasks"].keys()), [str(v) for v in view["tasks"].values()]]))
    return 0
