"""What is in a room, as the market's ``GET /status`` lists it (``room_summary``).

The counts by state are ``igora.summary``'s, shared with ``igora status`` and the web
page. The functions take the room's maps, keyed by ``MapName`` (a connected agent's
``Agent.maps``, or ``kanban_maps`` of a document), and awareness states; they import
nothing of the market's server."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from pycrdt import Awareness, Doc, Map

from ..protocol import KANBAN, MapName
from ..summary import tasks_by_state

__all__ = ["agent_states", "kanban_maps", "room_summary", "tasks_by_map", "tasks_by_state"]


class _Values(Protocol):
    def values(self) -> Iterable[Any]: ...

    def __len__(self) -> int: ...


def kanban_maps(doc: Doc[Any]) -> dict[MapName, Map[Any]]:
    """The four maps tasks go through, of a room's document."""
    return {m: doc.get(m.value, type=Map) for m in KANBAN}


def tasks_by_map(maps: Mapping[MapName, _Values]) -> dict[str, int]:
    """How many entries each kanban map holds, by map name (``todos``, ...)."""
    return {m.value: len(maps[m]) for m in KANBAN}


def agent_states(awareness: Awareness) -> list[dict[str, Any]]:
    """The awareness states of the agents in a room (not the room's own, none removed)."""
    return [s for c, s in awareness.states.items() if s and c != awareness.client_id]


def room_summary(
    name: str,
    doc: Doc[Any],
    awareness: Awareness,
    *,
    connections: int,
    archived: int,
    compactions: int,
) -> dict[str, Any]:
    """A room as the market's ``GET /status`` lists it."""
    return {
        "name": name,
        "connections": connections,
        "agents": agent_states(awareness),
        "tasks": tasks_by_map(kanban_maps(doc)),
        "archived": archived,
        "compactions": compactions,
    }
