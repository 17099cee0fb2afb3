"""Which waiting tasks no worker present could serve, judged over rounds.

A waiting v2 task whose model is not on the market, or that asks for what no worker
offers (tools, a JSON schema, embeddings...), would only end at its deadline; the broker
ends it ``failed`` with a typed ``errorCode`` instead. A task must stay unservable for
UNSERVABLE_AFTER first: a worker's awareness may arrive just after its task. Only tasks
never assigned are judged: a re-queued task waits for its worker to come back. An
original agent's task naming a model nobody serves is not judged: any text worker
answers it (``capabilities.model_for``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..capabilities import Unservable, unservable
from ..protocol import Peer, TaskField, is_original

UNSERVABLE_AFTER = 1.0  # seconds a v2 task stays unservable before it fails


class Unservables:
    def __init__(self) -> None:
        self.since: dict[str, float] = {}  # task id -> when it was first found unservable
        # Tasks found servable stay so until the workers' adverts change (a new view of
        # the peers): they are not judged again at every round.
        self._servable: tuple[int, set[str]] = (-1, set())

    def judge(
        self,
        waiting: list[dict[str, Any]],
        present: list[Peer],
        view: int,
        now: float,
        check: Callable[[dict[str, Any], list[Peer]], Unservable | None] | None = None,
    ) -> tuple[list[tuple[dict[str, Any], Unservable]], bool]:
        """The waiting tasks to fail now, with why, and whether others are still being
        judged (the caller looks again within UNSERVABLE_AFTER). ``view``: the version of
        the peers' adverts; ``now``: monotonic seconds; ``check``: why a task is
        unservable (None: it is not, or is not judged), v2's tasks by default."""
        check = check or _v2_check
        if self._servable[0] != view:
            self._servable = (view, set())
        servable = self._servable[1]
        seen = self.since
        waiting_ids = set()
        failures = []
        for task in waiting:
            tid = task[TaskField.ID]
            waiting_ids.add(tid)
            if tid in servable:
                continue
            why = check(task, present)
            if why is None:
                seen.pop(tid, None)
                servable.add(tid)
                continue
            first = seen.setdefault(tid, now)
            if now - first >= UNSERVABLE_AFTER:
                failures.append((task, why))
        pending = len(failures) < len([t for t in seen if t in waiting_ids])
        for tid in [t for t in seen if t not in waiting_ids]:
            del seen[tid]
        servable &= waiting_ids  # the tasks gone (assigned, ended): forgotten
        for task, _why in failures:
            seen.pop(task[TaskField.ID], None)
        return failures, pending


def _v2_check(task: dict[str, Any], present: list[Peer]) -> Unservable | None:
    """A v2 task never assigned, not aborted, not an original agent's: judged."""
    if task.get(TaskField.ABORTED) or is_original(task) or task.get(TaskField.ATTEMPTS):
        return None
    return unservable(task, present)
