"""Fair order between askers: one asker's hundred tasks must not starve another's one.

Tasks are grouped by asker, oldest first in each group; groups take turns. The asker
with the fewest tasks running, then the fewest served in the last ``window`` seconds,
goes first, so a newcomer with one task overtakes a long queue at the next free slot.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator
from typing import Any

from ..protocol import TaskField, number

DEFAULT_WINDOW = 60.0


def _date(task: dict[str, Any]) -> float:
    return number(task.get(TaskField.DATE)) or 0.0


def _asker(task: dict[str, Any]) -> str:
    return str(task.get(TaskField.ASKER) or "")


class Fairness:
    """Remembers whom the broker served recently."""

    def __init__(self, window: float = DEFAULT_WINDOW) -> None:
        self.window = window
        self._served: dict[str, deque[float]] = defaultdict(deque)

    def record(self, task: dict[str, Any]) -> None:
        self._served[_asker(task)].append(time.monotonic())

    def recent(self, asker: str) -> int:
        q = self._served.get(asker)
        if not q:
            return 0
        limit = time.monotonic() - self.window
        while q and q[0] < limit:
            q.popleft()
        if not q:
            del self._served[asker]
            return 0
        return len(q)

    def order(
        self, waiting: Iterable[dict[str, Any]], in_flight: dict[str, int] | None = None
    ) -> Iterator[dict[str, Any]]:
        in_flight = in_flight or {}
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for task in waiting:
            groups[_asker(task)].append(task)
        for tasks in groups.values():
            tasks.sort(key=_date)
        askers = sorted(
            groups, key=lambda a: (in_flight.get(a, 0), self.recent(a), _date(groups[a][0]))
        )
        depth = 0
        while askers:
            still = []
            for asker in askers:
                tasks = groups[asker]
                if depth < len(tasks):
                    yield tasks[depth]
                    still.append(asker)
            askers = still
            depth += 1


def fair_order(
    waiting: Iterable[dict[str, Any]], in_flight: dict[str, int] | None = None
) -> Iterator[dict[str, Any]]:
    """Fair order with no memory of past service (see ``Fairness.order``)."""
    return Fairness().order(waiting, in_flight)
