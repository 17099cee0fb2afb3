"""What the web page and ``igora status`` show of a v3 room, read from the market.

No agent of a v3 room reads the whole room: an asker reads its own tasks, ``who`` is for
brokers (protocol-v3.md §4). The market holds ``dir`` and ``who`` itself and keeps the
broker's ``board``, so it shows the three (``V3Room.view``) to whoever the room admits
(security.md §5): ``ask`` reads it over a proved connection (``CONTROL view``), ``fetch``
over HTTP (``GET /rooms/ROOM/view``, refused with ``MembersOnly`` by a market that admits
members only), ``read`` the one that works; ``snapshot`` turns it into the rows the v2
views show (``igora.summary``'s agent rows, the web page's task groups), every agent and
task naming its key (its identity id).
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from ..config import MarketAddress
from ..errors import IgoraError
from ..identity import load_identity
from ..summary import MAX_TEXT, agent_order, integer, text
from .session import Event, EventKind, Session
from .wire import Code, notice_answer

NOT_BUILT = 501  # the NOTICE of a CONTROL op the market does not know


class MembersOnly(IgoraError):
    """The market shows the room to its members only (HTTP 403 ``members_only``): ask
    over a connection that proves a member's identity."""


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
        members_only = isinstance(error, dict) and error.get("code") == "members_only"
        raise (MembersOnly if members_only else IgoraError)(f"{url}: {why}")
    return body


async def ask(session: Session, timeout: float = 10.0) -> dict[str, Any]:
    """The room's view, asked over ``session`` (``CONTROL view``, answered by ``NOTICE``
    206; asked again after a reconnection); ``IgoraError`` after ``timeout`` s or from a
    market that does not answer it (an older one)."""
    answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    def seen(event: Event) -> None:
        if answer.done():
            return
        if event.kind is EventKind.CONNECTED:
            session.control({"op": "view"})
        elif event.kind is EventKind.NOTICE and event.code == Code.VIEW:
            body = notice_answer(event.text, "view")
            if body is not None:
                answer.set_result(body)
        elif event.kind is EventKind.NOTICE and event.code == NOT_BUILT and "'view'" in event.text:
            answer.set_exception(IgoraError(f"{session.address.room_url}: {event.text}"))

    stop = session.observe(seen)
    try:
        session.control({"op": "view"})  # not connected: sent at the next CONNECTED
        return await asyncio.wait_for(answer, timeout)
    except TimeoutError:
        raise IgoraError(
            f"the market at {session.address.room_url} did not show the room within {timeout:g} s"
        ) from None
    finally:
        stop()


async def read(
    address: MarketAddress, timeout: float = 10.0, invite: str | None = None
) -> dict[str, Any]:
    """The room's view over HTTP or, from a market that shows it to its members only,
    over a connection that proves the identity of the data folder (``IGORA_DATA``),
    with ``invite`` if given: a non-member gets the market's refusal (``NotAdmitted``)."""
    try:
        return await fetch(address, timeout)
    except MembersOnly:
        identity, _ = load_identity()
        session = Session(
            address,
            identity,
            name="igora-status",
            state={"type": "client", "name": "igora-status"},  # as it shows in `who`
            connect_timeout=timeout,
            invite=invite,
        )
        async with session:
            return await ask(session, timeout)


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
