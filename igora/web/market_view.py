"""What the web page's market view shows: agents, tasks by state, throughput.

A ``MarketTracker`` watches the market through one connected ``Client`` (the gateway's).
Live tasks are read from the kanban maps at each snapshot. Finished tasks do not stay in
``done`` (their client removes them once read, the broker after its retention time), so
the tracker records each one as it appears there; the last ``KEEP_FINISHED`` are listed
and those of the last ``SERIES_SPAN`` seconds feed the throughput figures.

Prompts and answers are not part of the snapshot: the page shows who asked what model
(and what beyond a chat answer: tools, a JSON schema, embeddings...), who runs it and how
it went, not what was said.

A v3 room has no shared task maps and its asker reads only its own tasks:
``V3MarketTracker`` reads the market's view of the room instead (``igora.v3.view``: the
workers of ``dir``, the agents of ``who``, the broker's ``board``), at most once per
``V3_POLL`` seconds, and gives the same snapshot, each agent and task naming its key.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

from ..aio import within
from ..capabilities import BASIC, required
from ..client import Client
from ..errors import IgoraError
from ..protocol import KANBAN, MapName, State, TaskField, now_ms, number
from ..summary import agent_order, agent_summary, completion_tokens, integer, text
from ..v3 import view as room_view

KEEP_FINISHED = 50
"""Finished tasks listed in a snapshot (most recent first)."""
SERIES_SPAN = 300
"""Seconds of history in the throughput chart."""
BUCKET = 10
"""Seconds per point of the throughput chart."""
RATE_WINDOW = 60
"""Seconds over which ``tasksPerMin`` and ``tokensPerSec`` are averaged."""
MAX_COMPLETIONS = 20_000
"""Bound on remembered completions (a very busy market keeps only the newest)."""
MAX_NAMES = 2_000
LIVE_LIMIT = 200
"""Waiting or running tasks listed per group (the counts are always complete)."""
CACHE_MS = 500
"""A snapshot is reused by every page for this long while the market does not change."""
V3_POLL = 1.0
"""Seconds between two reads of a v3 room's view (its board changes at most once a second)."""
V3_ASK_TIMEOUT = 5.0
"""Seconds a read of the view waits for the market's answer."""

# Task states as the page groups them.
WAITING = (State.TODO, State.PREPARED)
GROUPS: dict[str, tuple[State, ...]] = {
    "waiting": WAITING,
    "running": (State.DOING,),
    "done": (State.DONE,),
    "failed": (State.FAILED,),
    "aborted": (State.ABORTED,),
}


@dataclass(frozen=True)
class Completion:
    end: int  # ms epoch
    state: str
    tokens: int


class MarketTracker:
    """Snapshots of one market for the web page, and a signal when it changes."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.version = 0
        self._event = asyncio.Event()
        self._finished: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._completions: deque[Completion] = deque(maxlen=MAX_COMPLETIONS)
        self._counted: OrderedDict[str, None] = OrderedDict()
        self._names: OrderedDict[str, tuple[str, str | None]] = OrderedDict()  # name, key
        self._cache: tuple[int, int, dict[str, Any]] | None = None
        client.on_change(self._changed)
        client.on_entries(MapName.DONE, self._on_done)
        for tid, value in client.entries(MapName.DONE):
            self._record(tid, value)

    # ------------------------------------------------------------------ change signal
    def _changed(self) -> None:
        self.version += 1
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def wait_change(self, version: int, timeout: float) -> None:
        """Return once ``self.version`` differs from ``version`` or after ``timeout`` s."""
        if self.version != version:
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await within(self._event.wait(), timeout)

    # ------------------------------------------------------------------ recording
    def _on_done(self, changes: dict[str, dict[str, Any]]) -> None:
        for tid, change in changes.items():
            self._record(tid, change.get("newValue"))

    def _record(self, tid: Any, value: Any) -> None:
        if not isinstance(tid, str) or not isinstance(value, dict):
            return
        state = value.get(TaskField.STATE)
        if state not in (State.DONE.value, State.FAILED.value, State.ABORTED.value):
            return
        end = number(value.get(TaskField.END))
        self._count(tid, self._summary(value, state), int(end) if end else now_ms())

    def _count(self, tid: str, row: dict[str, Any], end: int) -> None:
        """A finished task's row: listed (the last ``KEEP_FINISHED``) and, the first time
        it is seen, counted in the throughput."""
        if tid in self._counted:  # seen already: refresh its line, keep its place
            if tid in self._finished:
                self._finished[tid] = row
            return
        self._counted[tid] = None
        while len(self._counted) > MAX_COMPLETIONS:
            self._counted.popitem(last=False)
        self._finished[tid] = row
        while len(self._finished) > KEEP_FINISHED:
            self._finished.popitem(last=False)
        self._completions.append(Completion(end, str(row["state"]), row["tokens"] or 0))

    # ------------------------------------------------------------------ names
    def _remember(self, agent_id: str | None, name: str, key: str | None = None) -> None:
        if agent_id:
            self._names[agent_id] = (name, key)
            self._names.move_to_end(agent_id)
            while len(self._names) > MAX_NAMES:
                self._names.popitem(last=False)

    def _name_of(self, agent_id: Any) -> str | None:
        known = self._names.get(agent_id) if isinstance(agent_id, str) else None
        return known[0] if known else None

    def _key_of(self, agent_id: Any) -> str | None:
        """The key (identity id) an agent's awareness announced, if it did."""
        known = self._names.get(agent_id) if isinstance(agent_id, str) else None
        return known[1] if known else None

    # ------------------------------------------------------------------ snapshot
    def agents(self) -> list[dict[str, Any]]:
        own_id, own = self.client.own_state()
        states = [(p.client_id, p.state, False) for p in self.client.peers()]
        if own:
            states.append((own_id, own, True))
        rows = []
        for client_id, state, is_self in states:
            row = agent_summary(state, str(client_id))
            self._remember(row["id"], row["name"], row["key"])
            rows.append({**row, "self": is_self})
        rows.sort(key=agent_order)
        return rows

    def _summary(self, task: dict[str, Any], state: Any) -> dict[str, Any]:
        asker = text(task.get(TaskField.ASKER))
        worker = text(task.get(TaskField.WORKER))
        return {
            "id": text(task.get(TaskField.ID)),
            "state": state if isinstance(state, str) else None,
            "model": text(task.get(TaskField.MODEL)),
            "asker": asker,
            "askerName": text(task.get(TaskField.ASKER_NAME)) or self._name_of(asker),
            "worker": worker,
            "workerName": self._name_of(worker),
            "workerKey": self._key_of(worker),
            "date": number(task.get(TaskField.DATE)),
            "start": number(task.get(TaskField.START)),
            "end": number(task.get(TaskField.END)),
            "duration": number(task.get(TaskField.DURATION)),
            "attempts": integer(task.get(TaskField.ATTEMPTS)),
            "tokens": completion_tokens(task) or None,
            "maxTokens": number(task.get(TaskField.MAX_TOKENS)),
            "error": text(task.get(TaskField.ERROR), 500),
            "abortAsked": bool(task.get(TaskField.ABORTED)),
            "needs": sorted(required(task) - BASIC),  # tools, json_schema, embed...
        }

    async def current(self) -> dict[str, Any]:
        """The snapshot to show now (what the page's routes call)."""
        return self.snapshot()

    def snapshot(self) -> dict[str, Any]:
        """The whole view as plain JSON-able data (shared by all pages for ``CACHE_MS``
        while nothing changes)."""
        now = now_ms()
        if self._cache is not None:
            version, made, snap = self._cache
            if version == self.version and 0 <= now - made < CACHE_MS:
                return snap
        snap = self._snapshot()
        self._cache = (self.version, now, snap)
        return snap

    def _snapshot(self) -> dict[str, Any]:
        agents = self.agents()  # refreshes the id -> name memory first
        live: dict[str, dict[str, Any]] = {}
        for m in KANBAN:
            for tid, value in self.client.entries(m):
                if not isinstance(value, dict) or not isinstance(tid, str):
                    continue
                if m is MapName.DONE:
                    self._record(tid, value)
                    continue
                state = value.get(TaskField.STATE)
                if state not in (State.TODO.value, State.PREPARED.value, State.DOING.value):
                    state = {
                        MapName.TODOS: State.TODO,
                        MapName.PREPARED: State.PREPARED,
                        MapName.DOING: State.DOING,
                    }[m].value
                live[tid] = self._summary(value, state)
        # Names may have become known since a task was recorded.
        finished = []
        newest_first = sorted(reversed(self._finished.values()), key=lambda t: -(t["end"] or 0))
        for t in newest_first:
            t = dict(t)
            t["askerName"] = t["askerName"] or self._name_of(t["asker"])
            t["workerName"] = t["workerName"] or self._name_of(t["worker"])
            t["workerKey"] = t["workerKey"] or self._key_of(t["worker"])
            finished.append(t)
        tasks: dict[str, list[dict[str, Any]]] = {g: [] for g in GROUPS}
        group_of = {s.value: g for g, states in GROUPS.items() for s in states}
        for t in sorted(live.values(), key=lambda t: t["date"] or 0):
            tasks[group_of[t["state"]]].append(t)
        for t in finished:
            tasks[group_of[t["state"]]].append(t)
        counts = {g: len(v) for g, v in tasks.items()}
        for g in ("waiting", "running"):
            del tasks[g][LIVE_LIMIT:]
        return {
            "time": now_ms(),
            "room": self.client.address.room,
            "self": {"id": self.client.id, "name": self.client.name},
            "connected": self.client.connected,
            "agents": agents,
            "tasks": tasks,
            "counts": counts,
            "throughput": self.throughput(),
        }

    def throughput(self, now: int | None = None) -> dict[str, Any]:
        """Finished tasks per minute and generated tokens per second: averages over the
        last ``RATE_WINDOW`` s, and a series of ``BUCKET``-second points for the chart."""
        now = now_ms() if now is None else now
        n_buckets = SERIES_SPAN // BUCKET
        first = now - n_buckets * BUCKET * 1000
        buckets = [
            {"t": first + (i + 1) * BUCKET * 1000, "tasks": 0, "tokens": 0}
            for i in range(n_buckets)
        ]
        window_tasks = window_tokens = 0
        for c in self._completions:
            if c.end > first:
                i = min(n_buckets - 1, int((c.end - first) // (BUCKET * 1000)))
                buckets[i]["tasks"] += 1
                buckets[i]["tokens"] += c.tokens
            if c.end > now - RATE_WINDOW * 1000:
                window_tasks += 1
                window_tokens += c.tokens
        series = [
            {
                "t": b["t"],
                "tasksPerMin": b["tasks"] * 60 / BUCKET,
                "tokensPerSec": round(b["tokens"] / BUCKET, 2),
            }
            for b in buckets
        ]
        return {
            "window": RATE_WINDOW,
            "bucket": BUCKET,
            "tasksPerMin": round(window_tasks * 60 / RATE_WINDOW, 2),
            "tokensPerSec": round(window_tokens / RATE_WINDOW, 2),
            "series": series,
        }


class V3MarketTracker(MarketTracker):
    """Snapshots of a v3 room: the market's view of it (``igora.v3.view``), read at most
    every ``V3_POLL`` s while a page asks. Live tasks and the counts are the board's
    (``done``, ``failed``, ``aborted`` since the broker's lease); finished tasks are the
    last ``KEEP_FINISHED`` seen, as in a v2 room; the throughput's averages are the
    board's last minute, its chart the completions seen."""

    def __init__(self, client: Client) -> None:
        super().__init__(client)
        self._view: dict[str, Any] | None = None
        self._error: str | None = None
        self._read_at = -V3_POLL
        self._lock = asyncio.Lock()

    async def current(self) -> dict[str, Any]:
        async with self._lock:
            if time.monotonic() - self._read_at >= V3_POLL:
                try:
                    view: dict[str, Any] | None = await self._ask()
                    error = None
                except IgoraError as exc:
                    view, error = None, str(exc)
                self._read_at = time.monotonic()
                if (view, error) != (self._view, self._error):
                    self._view, self._error = view, error
                    self._changed()
        return self.snapshot()

    async def _ask(self) -> dict[str, Any]:
        """The view over the gateway's own connection (security.md §5: a market that
        admits members only shows it to them alone)."""
        asker = self.client.v3
        if asker is None or not asker.session.connected:
            raise IgoraError("the gateway is not connected to the market")
        return await room_view.ask(asker.session, V3_ASK_TIMEOUT)

    async def wait_change(self, version: int, timeout: float) -> None:
        if self.version == version:
            await asyncio.sleep(min(timeout, V3_POLL))

    def _priced(self, task: dict[str, Any]) -> dict[str, Any]:
        """A finished task's row with ``cost``: the price rule's figure (millicredits) for
        a task done, from the board's tokens, the model's size in its worker's advert and
        the market's published rule (``dir.market.prices``); None when one is missing."""
        asker = self.client.v3
        worker, prompt, tokens = task.get("workerKey"), task.get("promptTokens"), task["tokens"]
        cost = None
        if task["state"] == "done" and asker and worker and prompt is not None:
            cost = asker.price_of(worker, task["model"] or "*", prompt, tokens or 0)
        return {**task, "cost": cost}

    def _snapshot(self) -> dict[str, Any]:
        parts = room_view.snapshot(self._view or {})
        now = now_ms()
        for group in ("done", "failed", "aborted"):
            for t in reversed(parts["tasks"][group]):  # oldest first: the newest stay
                self._count(str(t["id"]), t, t["end"] or now)
        for a in parts["agents"]:
            self._remember(a["id"], a["name"], a["key"])
        finished = [
            self._priced(t) for t in sorted(self._finished.values(), key=lambda t: -(t["end"] or 0))
        ]
        tasks = {
            "waiting": parts["tasks"]["waiting"],
            "running": parts["tasks"]["running"],
            **{g: [t for t in finished if t["state"] == g] for g in ("done", "failed", "aborted")},
        }
        throughput = self.throughput(now)
        per_minute = parts["perMinute"]
        throughput["tasksPerMin"] = per_minute["done"] * 60 / RATE_WINDOW
        throughput["tokensPerSec"] = round(per_minute["tokens"] / RATE_WINDOW, 2)
        return {
            "time": now,
            "room": self.client.address.room,
            "protocol": 3,
            "self": {"id": self.client.id, "name": self.client.name},
            "connected": self.client.connected and self._view is not None,
            "error": self._error,
            "agents": [{**a, "self": a["id"] == self.client.id} for a in parts["agents"]],
            "broker": parts["broker"],
            "tasks": tasks,
            "counts": parts["counts"],
            "throughput": throughput,
        }


def tracker_for(state: Any) -> MarketTracker | None:
    """The tracker stored on an app's ``state`` (made on first use from ``state.client``,
    the gateway's ``Client``; None before the gateway has one): a ``V3MarketTracker``
    once the client speaks protocol 3."""
    client = getattr(state, "client", None)
    if not isinstance(client, Client):
        return None
    kind = V3MarketTracker if client.v3 is not None else MarketTracker
    tracker = getattr(state, "web_market", None)
    if type(tracker) is not kind or tracker.client is not client:
        tracker = kind(client)
        state.web_market = tracker
    return tracker
