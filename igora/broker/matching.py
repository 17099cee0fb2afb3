"""Which worker gets a task: one that serves the task's model and has a free slot.

A task naming no model goes to any text worker, as in the original; a task goes only to
a worker whose model offers every capability it needs (``igora.capabilities``). Among fitting
workers the one with the most free slots wins; ties are broken at random.
"""

from __future__ import annotations

import random
from typing import Any

from ..capabilities import fits, model_for, required
from ..protocol import TEXT_STYLE, AgentField, AgentState, Peer, TaskField


def free_slots(worker: Peer, load: dict[str, int]) -> int:
    state = worker.state.get(AgentField.STATE)
    if state == AgentState.BUSY.value:
        return 0
    if not worker.igora and state != AgentState.READY.value:
        return 0  # an original worker says "working" while it runs its one task
    return worker.slots - load.get(worker.id or "", 0)


Kind = tuple[str | None, frozenset[str], str]
"""What a worker must fit to take a task: its model, the capabilities, the style."""


def kind_of(task: dict[str, Any], present: list[Peer]) -> Kind:
    """The kind of ``task``; ``present``: every worker on the market (to tell whether an
    original task's model is served by anyone)."""
    return model_for(task, present), required(task), task.get(TaskField.STYLE) or TEXT_STYLE


def pick_worker(
    task: dict[str, Any],
    workers: list[Peer],
    load: dict[str, int],
    present: list[Peer] | None = None,
) -> Peer | None:
    """``present``: every worker on the market; default ``workers``."""
    return pick_for(kind_of(task, workers if present is None else present), workers, load)


def pick_for(kind: Kind, workers: list[Peer], load: dict[str, int]) -> Peer | None:
    """The worker that gets a task of ``kind``, or None if no worker has a slot for it."""
    model, needs, style = kind
    best: list[Peer] = []
    best_free = 0
    for w in workers:
        if w.state.get(AgentField.STYLE, TEXT_STYLE) != style or not fits(w, model, needs):
            continue
        free = free_slots(w, load)
        if free <= 0:
            continue
        if free > best_free:
            best, best_free = [w], free
        elif free == best_free:
            best.append(w)
    return random.choice(best) if best else None
