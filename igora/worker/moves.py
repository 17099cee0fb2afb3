"""A worker's writes to the market: each a lifecycle transition (``igora.lifecycle``)
applied in one transaction, with the worker's own rule on top: it ends only a task whose
``doing`` entry still names it, and removes every other entry under an id it ends."""

from __future__ import annotations

import logging
from array import array
from collections.abc import Callable, Collection
from typing import Any

from pycrdt import Text

from .. import lifecycle
from ..agent import Agent, discard
from ..protocol import FINAL_VALUES, LIVE, MapName, TaskField, abort_asked, now_ms, stream_key

REMEMBER_ENDED = 10_000  # ids of the last tasks this worker ended, to know their ghosts
ABORTED_UNSTARTED = "aborted before it started"

log = logging.getLogger("igora.worker")


class Ended:
    """The ids of the last ``size`` tasks ended, as their 64-bit hashes in a ring set up
    at once (80 kB for 10,000): the memory does not move as tasks end. A dict of the ids
    themselves cost ~1 MB, filled only after 10,000 tasks, so a worker's memory rose for
    its first 10,000 tasks. Two ids with the same hash (odds ~1 in 10^15 for each look-up
    among 10,000) would make a ghost of a live task's stray entry: it is dropped instead
    of handed back, and the task ends at its deadline."""

    def __init__(self, size: int = REMEMBER_ENDED) -> None:
        self._ring = array("q", bytes(8 * size))
        self._next = 0

    def add(self, task_id: str) -> None:
        self._ring[self._next] = hash(task_id) or 1  # 0 marks an empty slot
        self._next = (self._next + 1) % len(self._ring)

    def __contains__(self, task_id: object) -> bool:
        return (hash(task_id) or 1) in self._ring


class Moves:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        # Tasks this worker ended lately: an entry a race brings back under one of those
        # ids is a ghost, to drop (not to hand back, nor to end again).
        self.ended = Ended()

    def own_entry(self, task_id: str) -> dict[str, Any] | None:
        """The task's ``doing`` entry if it names this worker, else None."""
        current = self.agent.maps[MapName.DOING].get(task_id)
        if isinstance(current, dict) and current.get(TaskField.WORKER) == self.agent.id:
            return current
        return None

    def start(self, task_id: str, task: dict[str, Any], attempt: int) -> dict[str, Any]:
        """Move an assigned task to ``doing`` with an empty stream; return its entry."""
        key = stream_key(task_id, attempt)
        step = lifecycle.start(task, self.agent.id, key, now_ms())
        maps = self.agent.maps
        with self.agent.transaction():
            discard(maps[MapName.PREPARED], task_id)
            maps[step.map][task_id] = step.task
            maps[MapName.STREAMS][key] = Text()
        return step.task

    def end_running(
        self,
        task_id: str,
        key: str,
        step_of: Callable[[dict[str, Any]], lifecycle.Step],
        entry: dict[str, Any] | None = None,
    ) -> None:
        """End a running task with ``step_of(its doing entry)``, if that entry still names
        this worker (or from ``entry``: its doing entry was deleted). Its stream goes."""
        with self.agent.transaction():
            current = entry if entry is not None else self.own_entry(task_id)
            discard(self.agent.maps[MapName.STREAMS], key)
            if current is None:
                return  # someone else (the broker) already ended or moved it
            self.drop_entries(task_id)
            step = step_of(current)
            self.agent.maps[step.map][task_id] = step.task

    def drop_stream(self, key: str) -> None:
        """Remove a stream of a task taken away from this worker."""
        with self.agent.transaction():
            discard(self.agent.maps[MapName.STREAMS], key)

    def requeue_running(self, task_id: str, key: str) -> None:
        """Hand a running task back to ``todos`` (if its doing entry still names this
        worker); its stream goes."""
        with self.agent.transaction():
            current = self.own_entry(task_id)
            discard(self.agent.maps[MapName.STREAMS], key)
            if current is None:
                return
            discard(self.agent.maps[MapName.DOING], task_id)
            step = lifecycle.requeue(current)
            self.agent.maps[step.map][task_id] = step.task

    def hand_back(self, source: MapName, task_id: str, task: dict[str, Any]) -> None:
        """Hand a task this worker did not start (found in ``source``) back to ``todos``."""
        with self.agent.transaction():
            self.agent.maps[source].pop(task_id, None)
            step = lifecycle.requeue(task)
            self.agent.maps[step.map][task_id] = step.task

    def end_unstarted(self, source: MapName, task_id: str, step: lifecycle.Step) -> None:
        """End a task this worker did not start (found in ``source``)."""
        with self.agent.transaction():
            self.agent.maps[source].pop(task_id, None)
            self.drop_entries(task_id)
            self.agent.maps[step.map][task_id] = step.task

    def settle_strays(self, running: Collection[str]) -> None:
        """Tasks ``doing`` says this worker runs while it does not (a forged entry, or a
        write that lost a race) go back to ``todos`` for the broker to assign again;
        otherwise they would wait for their deadline, since this worker is present. A
        ghost of a task that ended is dropped; one marked aborted ends ``aborted``."""
        maps, me, name = self.agent.maps, self.agent.id, self.agent.name
        strays = [
            (tid, v)
            for tid, v in list(maps[MapName.DOING].items())
            if isinstance(v, dict) and v.get(TaskField.WORKER) == me and tid not in running
        ]
        if not strays:
            return
        with self.agent.transaction():
            for tid, value in strays:
                final = maps[MapName.DONE].get(tid)
                if tid in self.ended or (
                    isinstance(final, dict) and final.get(TaskField.STATE) in FINAL_VALUES
                ):
                    # A write that raced with the task's end (an abort mark, say) brought
                    # the entry back: the task is over, drop the ghost.
                    self.drop_entries(tid)
                    log.info("%s: dropped ended task %s left in doing", name, tid)
                elif abort_asked(
                    value, maps[MapName.TODOS].get(tid), maps[MapName.PREPARED].get(tid)
                ):
                    log.info(
                        "%s: task %s left in doing under this worker was aborted; ended", name, tid
                    )
                    self.end_unstarted(
                        MapName.DOING,
                        tid,
                        lifecycle.abort(value, now_ms(), error=ABORTED_UNSTARTED),
                    )
                else:
                    log.warning(
                        "%s: task %s is in doing under this worker, which is not "
                        "running it; handed back to todos",
                        name,
                        tid,
                    )
                    self.hand_back(MapName.DOING, tid, value)

    def drop_entries(self, task_id: str) -> None:
        """Whoever ends a task removes every entry under its id in todos, prepared and
        doing: a write that raced with a move may have left one behind."""
        for name in LIVE:
            discard(self.agent.maps[name], task_id)
        self.ended.add(task_id)
