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


class _Served:
    """Tasks served to one asker, counted per ``STEP`` seconds."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts: deque[list[float]] = deque()  # [start of the step, tasks served in it]
        self.total = 0


class Fairness:
    """Remembers whom the broker served recently: for each asker, how many tasks in each
    ``STEP`` of the last ``window`` seconds. Counts, not one entry per task: the memory is
    set by the number of askers, not by the rate of tasks (at 500 tasks/s, one timestamp
    per task was 30,000 objects, and the broker's memory rose for a whole window)."""

    STEP = 1.0

    def __init__(self, window: float = DEFAULT_WINDOW) -> None:
        self.window = window
        self._served: dict[str, _Served] = {}
        self._swept = time.monotonic()

    def record(self, task: dict[str, Any]) -> None:
        now = time.monotonic()
        served = self._served.get(_asker(task))
        if served is None:
            served = self._served[_asker(task)] = _Served()
        step = now - now % self.STEP
        if served.counts and served.counts[-1][0] == step:
            served.counts[-1][1] += 1
        else:
            served.counts.append([step, 1])
        served.total += 1
        if now - self._swept > self.window:  # forget the askers served no more
            self._swept = now
            for asker in list(self._served):
                self.recent(asker)

    def recent(self, asker: str) -> int:
        """Tasks served to ``asker`` in the last ``window`` seconds (to one ``STEP``)."""
        served = self._served.get(asker)
        if served is None:
            return 0
        limit = time.monotonic() - self.window
        counts = served.counts
        while counts and counts[0][0] + self.STEP <= limit:
            served.total -= int(counts.popleft()[1])
        if not counts:
            del self._served[asker]
            return 0
        return served.total

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
