"""Fair order between askers: one asker's hundred tasks must not starve another's one.

Tasks are grouped by asker, oldest first in each group; groups take turns, the asker with
the fewest tasks already running going first.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

from ..protocol import F


def _date(task: dict[str, Any]) -> float:
    d = task.get(F.DATE)
    return float(d) if isinstance(d, (int, float)) and not isinstance(d, bool) else 0.0


def fair_order(
    waiting: Iterable[dict[str, Any]], in_flight: dict[str, int] | None = None
) -> Iterator[dict[str, Any]]:
    in_flight = in_flight or {}
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for task in waiting:
        groups[str(task.get(F.ASKER) or "")].append(task)
    for tasks in groups.values():
        tasks.sort(key=_date)
    askers = sorted(groups, key=lambda a: (in_flight.get(a, 0), _date(groups[a][0])))
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
