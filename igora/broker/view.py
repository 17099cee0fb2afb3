"""The broker's view of the live maps: their valid tasks, and the invalid ones with why.

Kept up to date from the maps' events, so a round reads only what changed, not every task
of the room; a full read now and then is the safety net."""

from __future__ import annotations

from typing import Any

from ..agent import Agent
from ..protocol import MapName, ProtocolError, TaskField, abort_asked, validate_task

WATCHED = (MapName.TODOS, MapName.PREPARED, MapName.DOING)


def check(tid: str, value: Any) -> dict[str, Any]:
    """A valid task stored under ``tid``, or ProtocolError."""
    task = validate_task(value)
    if task[TaskField.ID] != tid:
        raise ProtocolError(f"id {task[TaskField.ID]!r} does not match its key")
    return task


class TaskView:
    def __init__(self) -> None:
        self.valid: dict[MapName, dict[str, dict[str, Any]]] = {n: {} for n in WATCHED}
        self.invalid: dict[MapName, dict[str, tuple[Any, str]]] = {n: {} for n in WATCHED}

    def update(self, name: MapName, changes: dict[str, dict[str, Any]]) -> tuple[bool, bool]:
        """Take the changes of one map; return (a round is due, the policies are due)."""
        valid, invalid = self.valid[name], self.invalid[name]
        wake = name is MapName.TODOS
        policies = False
        for tid, change in changes.items():
            if change.get("action") == "delete":
                valid.pop(tid, None)
                invalid.pop(tid, None)
                wake = True
                continue
            value = change.get("newValue")
            try:
                valid[tid] = check(tid, value)
                invalid.pop(tid, None)
            except ProtocolError as exc:
                valid.pop(tid, None)
                invalid[tid] = (value, str(exc))
                wake = policies = True
                continue
            if abort_asked(value):  # also a marked entry a race brought back ("add")
                wake = policies = True
            elif change.get("action") == "add":
                wake = True
            # Value refreshes of running tasks (compatibility fields) need no new round.
        return wake, policies

    def read_all(self, agent: Agent) -> None:
        """Read every task of the watched maps again (the events keep the view between)."""
        for source in WATCHED:
            valid: dict[str, dict[str, Any]] = {}
            invalid: dict[str, tuple[Any, str]] = {}
            for tid, value in list(agent.maps[source].items()):
                try:
                    valid[tid] = check(tid, value)
                except ProtocolError as exc:
                    invalid[tid] = (value, str(exc))
            self.valid[source], self.invalid[source] = valid, invalid
