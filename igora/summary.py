"""What is in a room, as plain data: one home for the agent rows and task counts that
``igora status`` (``igora.roles``) and the web page's market view (``igora.web``) show.

The functions read awareness states and the room's task maps as given (any mapping of
``MapName`` to a map of task values), so they depend on neither the market's server nor
a connection. Values written by others are bounded and type-checked: a malformed
awareness state or task shows as ``None`` fields, never as an error.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from .protocol import KANBAN, AgentField, AgentType, MapName, State, TaskField, number

MAX_TEXT = 200
"""Characters of a name (agent, model) kept in a summary."""
MAX_MODELS = 50
"""Models of one agent listed in a summary."""
TYPE_ORDER = {AgentType.WORKER.value: 0, AgentType.BROKER.value: 1, AgentType.CLIENT.value: 2}


class Values(Protocol):
    """What the summaries read of a task map."""

    def values(self) -> Iterable[Any]: ...


def integer(value: Any) -> int | None:
    """``value`` as an int if it is a number a JSON reader keeps exact, else None."""
    n = number(value)
    return int(n) if n is not None and abs(n) < 2**53 else None


def text(value: Any, limit: int = MAX_TEXT) -> str | None:
    """A non-empty string cut at ``limit`` characters, else None."""
    return value[:limit] if isinstance(value, str) and value else None


def agent_summary(state: Mapping[str, Any], fallback_name: str = "") -> dict[str, Any]:
    """One agent's awareness state as a row: who it is, what it serves and how busy it is."""
    aid = text(state.get(AgentField.ID))
    models = []
    raw_models = state.get(AgentField.MODELS)
    for m in raw_models[:MAX_MODELS] if isinstance(raw_models, list) else []:
        if isinstance(m, dict) and isinstance(m.get("name"), str):
            models.append(
                {"name": m["name"][:MAX_TEXT], "contextLength": integer(m.get("contextLength"))}
            )
        elif isinstance(m, str):
            models.append({"name": m[:MAX_TEXT], "contextLength": None})
    return {
        "id": aid,
        "name": str(state.get(AgentField.NAME) or aid or fallback_name)[:MAX_TEXT],
        "type": text(state.get(AgentField.TYPE), 40),
        "style": text(state.get(AgentField.STYLE), 60),
        "state": text(state.get(AgentField.STATE), 40),
        "models": models,
        "slots": integer(state.get(AgentField.SLOTS)),
        "running": integer(state.get(AgentField.RUNNING)),
        "speed": number(state.get(AgentField.SPEED)),
        "engine": text(state.get(AgentField.ENGINE), 60),
        "leader": bool(state.get(AgentField.LEADER)) if AgentField.LEADER in state else None,
        "igora": state.get(AgentField.PROTOCOL) is not None,
        "key": text(state.get(AgentField.KEY), 100),
    }


def agent_order(row: Mapping[str, Any]) -> tuple[int, str]:
    """Sort key of agent rows: workers, brokers, askers, others; then by name."""
    return TYPE_ORDER.get(row["type"] or "", len(TYPE_ORDER)), str(row["name"])


def tasks_by_state(maps: Mapping[MapName, Values]) -> dict[str, int]:
    """How many tasks of the kanban maps are in each state (every ``State``, 0 if none),
    by the state written in the task; an entry with no valid state is not counted."""
    counts = {st.value: 0 for st in State}
    for m in KANBAN:
        for value in maps[m].values():
            st = value.get(TaskField.STATE) if isinstance(value, dict) else None
            if st in counts:
                counts[st] += 1
    return counts


def usage_counts(task: Mapping[str, Any]) -> tuple[int, int]:
    """The prompt and completion tokens a finished task reports in its usage (0 for a
    count it does not report or that is not a number of 0 or more)."""
    usage = task.get(TaskField.USAGE)
    counts = []
    for key in (TaskField.PROMPT_TOKENS, TaskField.COMPLETION_TOKENS):
        n = number(usage.get(key)) if isinstance(usage, dict) else None
        counts.append(int(n) if n is not None and 0 <= n < 2**53 else 0)
    return counts[0], counts[1]


def completion_tokens(task: Mapping[str, Any]) -> int:
    """Tokens a finished task generated, from its usage (0 if it reports none)."""
    return usage_counts(task)[1]
