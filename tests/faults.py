"""Helpers of the chaos suite (``tests/test_faults_*.py``): observers, polling, evidence.

Everything here works on real processes started by ``igora.testing.Cluster``; nothing is
mocked. Waits (``wait_for``, from igora.testing) poll a condition with a deadline; they
never assert on timing.
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.error
import urllib.request
from collections import Counter
from typing import Any

from igora.agent import Agent
from igora.config import market_address
from igora.protocol import TEXT_STYLE, AgentType, MapName, State, TaskField, new_id, now_ms
from igora.testing import Cluster, Proc, wait_for

__all__ = [
    "agents",
    "archived",
    "archived_async",
    "by_name",
    "executions",
    "final_of",
    "leader",
    "observer",
    "put",
    "raw_task",
    "wait_for",
    "worker_name",
]

STARTED = re.compile(r"task (\S+) started")


def observer(cluster: Cluster, name: str = "observer", heartbeat: float = 1.0) -> Agent:
    """A raw agent of type client: reads the live document and can write anything."""
    return Agent(
        market_address(cluster.url),
        type=AgentType.CLIENT.value,
        name=name,
        style=TEXT_STYLE,
        heartbeat=heartbeat,
    )


def archived(cluster: Cluster, task_id: str, room: str = "market") -> dict[str, Any] | None:
    """The market archive's copy of a finished task, or None."""
    url = f"http://127.0.0.1:{cluster.port}/rooms/{room}/tasks/{task_id}"
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            task: dict[str, Any] = json.loads(r.read())
        return task
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise
    except OSError:
        return None  # the market is restarting


async def archived_async(cluster: Cluster, task_id: str, timeout: float = 20) -> dict[str, Any]:
    """The archived task, once the market has written it (it flushes every 50 ms)."""

    async def get() -> dict[str, Any] | None:
        return await asyncio.to_thread(archived, cluster, task_id)

    return await wait_for(get, timeout, f"task {task_id} archived by the market", cluster)


def executions(*workers: Proc) -> Counter[str]:
    """How many times each task id was started, from the workers' logs."""
    counts: Counter[str] = Counter()
    for w in workers:
        counts.update(STARTED.findall(w.log()))
    return counts


def agents(cluster: Cluster, type: str) -> list[dict[str, Any]]:
    try:
        return cluster.agents(type)
    except OSError:
        return []


def leader(cluster: Cluster) -> dict[str, Any] | None:
    """The broker that advertises itself as the active one (None if none or several)."""
    leaders = [a for a in agents(cluster, "broker") if a.get("leader") is True]
    return leaders[0] if len(leaders) == 1 else None


def by_name(procs: list[Proc], name: str) -> Proc:
    """The process started with ``--name name``."""
    for p in procs:
        if "--name" in p.args and p.args[p.args.index("--name") + 1] == name:
            return p
    raise KeyError(name)


def worker_name(agent: Agent, worker_id: str) -> str | None:
    for p in agent.peers(include_stale=True):
        if p.id == worker_id:
            return p.name
    return None


def raw_task(asker: Agent, prompt: str = "raw task", **fields: Any) -> dict[str, Any]:
    """A well-formed task as an original client writes it (no Igora client needed)."""
    tid = fields.pop("id", None) or new_id()
    return {
        TaskField.ID: tid,
        TaskField.ASKER: asker.id,
        TaskField.CLIENT_ID: asker.awareness.client_id,
        TaskField.STYLE: TEXT_STYLE,
        TaskField.STATE: State.TODO.value,
        TaskField.DATE: now_ms(),
        TaskField.PROMPT: prompt,
        **fields,
    }


def put(agent: Agent, mp: MapName, key: str, value: Any) -> None:
    with agent.transaction():
        agent.maps[mp][key] = value


def final_of(agent: Agent, task_id: str) -> dict[str, Any] | None:
    value = agent.maps[MapName.DONE].get(task_id)
    return value if isinstance(value, dict) else None
