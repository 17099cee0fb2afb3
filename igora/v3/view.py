"""What the web page and ``igora status`` show of a v3 room, read from the market.

No agent of a v3 room reads the whole room: an asker reads its own tasks, ``who`` is for
brokers (protocol-v3.md §4). The market holds ``dir`` and ``who`` itself and keeps the
broker's ``board``, so it answers ``GET /rooms/ROOM/view`` (``V3Room.view``) with the
three; ``fetch`` reads it and ``snapshot`` turns it into the rows the v2 views show
(``igora.summary``'s agent rows, the web page's task groups), every agent and task
naming its key (its identity id).
"""

from __future__ import annotations

from typing import Any

import httpx

from ..config import MarketAddress
from ..errors import IgoraError
from ..summary import MAX_TEXT, agent_order, integer, text

GROUPS = ("waiting", "running", "done", "failed", "aborted")


def view_url(address: MarketAddress) -> str:
    """``GET /rooms/ROOM/view`` of the room's (first) market."""
    return f"{address.http_url}/rooms/{address.room}/view"


async def fetch(address: MarketAddress, timeout: float = 5.0) -> dict[str, Any]:
    """The market's view of the room; ``IgoraError`` saying why when there is none."""
    url = view_url(address)
    try:
        async with httpx.AsyncClient(timeout=timeout) as http:
            r = await http.get(url)
    except httpx.HTTPError as exc:
        raise IgoraError(f"cannot read {url}: {exc or type(exc).__name__}") from None
    try:
        body = r.json()
    except ValueError:
        body = None
    if r.status_code != 200 or not isinstance(body, dict):
        error = body.get("error") if isinstance(body, dict) else None
        why = error.get("message") if isinstance(error, dict) else f"HTTP {r.status_code}"
        raise IgoraError(f"{url}: {why}")
    return body


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _has_id(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("id"), str)


def _models(raw: Any) -> list[dict[str, Any]]:
    out = []
    for m in raw if isinstance(raw, list) else []:
        if isinstance(m, dict) and isinstance(m.get("name"), str):
            out.append(
                {"name": m["name"][:MAX_TEXT], "contextLength": integer(m.get("contextLength"))}
            )
    return out


def agents(view: dict[str, Any], tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Agent rows (``igora.summary.agent_summary``'s fields, and ``key``) of the agents
    present (``who``) and the workers advertised (``dir``); a worker's ``running`` is
    the board's count of its running tasks."""
    workers = {w["id"][:100]: w for w in _list(view.get("workers")) if _has_id(w)}
    broker = _dict(view.get("broker")).get("id")
    running: dict[str, int] = {}
    for t in tasks:
        if t.get("state") == "running" and isinstance(t.get("worker"), str):
            running[t["worker"]] = running.get(t["worker"], 0) + 1
    present = {a["id"][:100]: a for a in _list(view.get("agents")) if _has_id(a)}
    rows = []
    for id_ in list(present) + [i for i in workers if i not in present]:
        who, advert = present.get(id_) or {}, workers.get(id_)
        kind = text(who.get("type"), 40) or ("worker" if advert else None)
        row: dict[str, Any] = {
            "id": id_,
            "key": id_,
            "name": text(who.get("name")) or text((advert or {}).get("name")) or id_[:8],
            "type": kind,
            "style": None,
            "state": None,
            "models": [],
            "slots": None,
            "running": None,
            "speed": None,
            "engine": None,
            "leader": (id_ == broker) if kind == "broker" else None,
            "igora": True,
        }
        if advert is not None:
            row.update(
                state=text(advert.get("state"), 40),
                models=_models(advert.get("models")),
                slots=integer(advert.get("slots")),
                running=running.get(id_, 0),
                engine=text(advert.get("engine"), 60),
            )
        rows.append(row)
    rows.sort(key=agent_order)
    return rows


def tasks(view: dict[str, Any]) -> list[dict[str, Any]]:
    """The board's task rows in the web page's task shape (``market_view``), with the
    names of the agents present; [] without a board."""
    board = _dict(view.get("board"))
    names = {
        a["id"]: text(a.get("name"))
        for a in _list(view.get("agents")) + _list(view.get("workers"))
        if _has_id(a)
    }
    out = []
    for t in _list(board.get("tasks")):
        if not isinstance(t, dict) or t.get("state") not in GROUPS:
            continue
        start, end = integer(t.get("start")), integer(t.get("end"))
        worker, asker = text(t.get("worker")), text(t.get("asker"))
        out.append(
            {
                "id": text(t.get("id")),
                "state": t["state"],
                "model": text(t.get("model")),
                "asker": asker,
                "askerName": names.get(asker),
                "worker": worker,
                "workerName": names.get(worker),
                "workerKey": worker,
                "date": integer(t.get("date")),
                "start": start,
                "end": end,
                "duration": end - start if start and end and end >= start else None,
                "attempts": integer(t.get("attempt")),
                "tokens": integer(t.get("tokens")),
                "promptTokens": integer(t.get("promptTokens")),
                "maxTokens": None,
                "error": text(t.get("errorCode")),
                "abortAsked": False,
                "needs": [],
            }
        )
    return out


def snapshot(view: dict[str, Any]) -> dict[str, Any]:
    """``agents``, ``tasks`` (by group), ``counts`` and ``throughput`` (per minute, from
    the board) of a room's view: the fields of the web page's snapshot."""
    board = _dict(view.get("board"))
    rows = tasks(view)
    grouped: dict[str, list[dict[str, Any]]] = {g: [] for g in GROUPS}
    for t in rows:
        grouped[t["state"]].append(t)
    raw_counts = _dict(board.get("counts"))
    counts = {g: integer(raw_counts.get(g)) or 0 for g in GROUPS}
    per_minute = _dict(board.get("perMinute"))
    return {
        "agents": agents(view, rows),
        "tasks": grouped,
        "counts": counts,
        "broker": {"id": text(broker.get("id")), "epoch": integer(broker.get("epoch"))}
        if (broker := _dict(view.get("broker")))
        else None,
        "board": {"at": integer(board.get("at")), "since": integer(board.get("since"))}
        if board
        else None,
        "models": {
            str(m)[:MAX_TEXT]: {g: integer(n.get(g)) or 0 for g in ("waiting", "running", "done")}
            for m, n in _dict(board.get("models")).items()
            if isinstance(n, dict)
        },
        "perMinute": {
            "done": integer(per_minute.get("done")) or 0,
            "tokens": integer(per_minute.get("tokens")) or 0,
        },
    }
