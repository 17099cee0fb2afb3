"""The broker's policies, each a small function over one snapshot of the market.

- ``recover``: tasks of workers that vanished go back to ``todos`` (up to
  ``max_attempts`` assignments), then ``failed``;
- ``unclaimed``: tasks a present worker does not claim (start) in time go back to ``todos``;
- ``abort``: tasks whose abort was asked, on any of their entries, or whose asker
  vanished are ``aborted``;
- ``stale_copies``: entries left behind by a write that raced with a move are removed;
- ``expire``: tasks past their deadline are ``failed`` with the reason;
- ``retain``: finished tasks leave the live document after ``retention`` seconds (the
  market has archived them already).

Each returns the writes to make, each a transition of ``igora.lifecycle`` (the policies
decide which task changes and when, never how); the broker applies them in one
transaction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import lifecycle
from ..lifecycle import attempts, number
from ..protocol import (
    ABORTED_MARK,
    LIVE,
    ErrorCode,
    MapName,
    TaskField,
    abort_asked,
    now_ms,
    stream_key,
)

DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_TIMEOUT = 600.0  # seconds a task may live when it names no deadline
DEFAULT_RETENTION = 600.0
DEFAULT_CLAIM_TIMEOUT = 30.0  # seconds a present worker has to take a task assigned to it
ABORT_GRACE = 10.0  # seconds a worker has to end a task marked aborted
CARRY_AFTER = 1.0  # seconds before a mark left on a stale entry is copied to doing[id]


@dataclass
class Snapshot:
    todos: dict[str, Any]
    prepared: dict[str, Any]
    doing: dict[str, Any]
    now: int = field(default_factory=now_ms)


@dataclass
class Move:
    """Delete ``task_id`` from ``source`` (if given) and write ``task`` to ``target``;
    delete the stale entries under the same id in ``stale`` too."""

    task_id: str
    source: MapName | None
    target: MapName | None
    task: dict[str, Any] | None
    why: str = ""
    drop_stream: str | None = None
    stale: tuple[MapName, ...] = ()

    @classmethod
    def of(
        cls,
        task_id: str,
        source: MapName | None,
        step: lifecycle.Step,
        why: str,
        drop_stream: str | None = None,
        stale: tuple[MapName, ...] = (),
    ) -> Move:
        """The move of a lifecycle transition."""
        return cls(task_id, source, step.map, step.task, why, drop_stream, stale)


def _stream_of(task: dict[str, Any]) -> str | None:
    s = task.get(TaskField.STREAM)
    return s if isinstance(s, str) else None


def recover(snap: Snapshot, present: Callable[[Any], bool], max_attempts: int) -> list[Move]:
    moves = []
    for source, tasks in ((MapName.PREPARED, snap.prepared), (MapName.DOING, snap.doing)):
        for tid, task in tasks.items():
            worker = task.get(TaskField.WORKER)
            if present(worker):
                continue
            tries = attempts(task)
            if tries >= max_attempts:
                moves.append(
                    Move.of(
                        tid,
                        source,
                        lifecycle.fail(
                            task,
                            snap.now,
                            ErrorCode.WORKER_LOST,
                            f"the worker running it vanished ({tries} attempts)",
                        ),
                        "failed: worker vanished too often",
                        _stream_of(task),
                    )
                )
            else:
                moves.append(
                    Move.of(
                        tid,
                        source,
                        lifecycle.requeue(task),
                        f"re-queued: worker {worker} vanished",
                        _stream_of(task),
                    )
                )
    return moves


def unclaimed(snap: Snapshot, claim_timeout: float, max_attempts: int) -> list[Move]:
    """Tasks left in ``prepared`` longer than ``claim_timeout`` although their worker is
    present (hung, or advertising slots it does not have) go back to ``todos``, up to
    ``max_attempts`` assignments, then ``failed``. A live worker takes a task within
    milliseconds of its assignment."""
    moves = []
    for tid, task in snap.prepared.items():
        start = number(task, TaskField.START)
        if start is None or snap.now - start <= claim_timeout * 1000:
            continue
        tries = attempts(task)
        worker = task.get(TaskField.WORKER)
        if tries >= max_attempts:
            moves.append(
                Move.of(
                    tid,
                    MapName.PREPARED,
                    lifecycle.fail(
                        task,
                        snap.now,
                        ErrorCode.NOT_STARTED,
                        f"no worker took it ({tries} attempts)",
                    ),
                    "failed: never taken",
                )
            )
        else:
            moves.append(
                Move.of(
                    tid,
                    MapName.PREPARED,
                    lifecycle.requeue(task),
                    f"re-queued: worker {worker} did not take it within {claim_timeout:g} s",
                )
            )
    return moves


def entries(snap: Snapshot, tid: str) -> list[tuple[MapName, dict[str, Any]]]:
    """The entries under one task id in todos, prepared and doing, the most advanced last.
    A task has one; two mean that a write raced with a move of the task (Yjs keeps both)."""
    maps = {MapName.TODOS: snap.todos, MapName.PREPARED: snap.prepared, MapName.DOING: snap.doing}
    return [(m, maps[m][tid]) for m in LIVE if tid in maps[m]]


def _duplicated(snap: Snapshot) -> set[str]:
    ids: set[str] = set()
    for a, b in (
        (snap.todos, snap.prepared),
        (snap.todos, snap.doing),
        (snap.prepared, snap.doing),
    ):
        small, big = (a, b) if len(a) <= len(b) else (b, a)
        ids.update(tid for tid in small if tid in big)
    return ids


def abort(snap: Snapshot, present: Callable[[Any], bool], abort_seen: dict[str, int]) -> list[Move]:
    """Tasks to abort: a mark on any of their entries (the mark belongs to the task), or
    their asker gone. A task that is not running ends ``aborted`` here, every entry under
    its id removed in the same transaction (a worker that started it meanwhile sees the
    mark in ``done`` and stops). A running one is its worker's to end, at its next token;
    if it is still running CARRY_AFTER s after the mark was first seen (an original worker
    reads only ``doing[id]``), the mark is copied to its ``doing`` entry and the stale
    entries removed; ABORT_GRACE s after, or at once if its worker is gone, it ends here."""
    moves = []
    for tid in set(snap.todos) | set(snap.prepared) | set(snap.doing):
        copies = entries(snap, tid)
        live_map, live = copies[-1]
        stale = tuple(m for m, _ in copies[:-1])
        asker = next(
            (t.get(TaskField.ASKER) for _, t in copies if isinstance(t.get(TaskField.ASKER), str)),
            None,
        )
        marked = abort_asked(*(t for _, t in copies))
        left = asker is not None and not present(asker)
        if not marked and not left:
            continue
        why = "aborted by its asker" if marked else f"aborted: asker {asker} left"
        if live_map is not MapName.DOING:
            moves.append(Move.of(tid, live_map, lifecycle.abort(live, snap.now), why, stale=stale))
            continue
        # The time the mark was first seen stays in memory: rewriting a running task at
        # each round would race with its worker ending it (a concurrent write brings a
        # deleted entry back).
        first = abort_seen.setdefault(tid, snap.now)
        waited = snap.now - first
        if not present(live.get(TaskField.WORKER)) or waited > ABORT_GRACE * 1000:
            moves.append(
                Move.of(
                    tid,
                    MapName.DOING,
                    lifecycle.abort(live, snap.now),
                    "aborted: worker did not stop",
                    _stream_of(live),
                    stale,
                )
            )
        elif live.get(TaskField.ABORTED):
            if stale:
                moves.append(Move(tid, None, None, None, "stale entries removed", stale=stale))
        elif left or waited > CARRY_AFTER * 1000:
            # An Igora worker sees a mark on any entry and stops at once; an original
            # worker reads only doing[id]. The stale entry holding the mark goes once the
            # mark is on doing[id], not before.
            moves.append(
                Move(
                    tid,
                    None,
                    MapName.DOING,
                    {**live, TaskField.ABORTED: ABORTED_MARK},
                    f"abort asked ({why}); told its worker",
                    stale=stale,
                )
            )
    for tid in [t for t in abort_seen if t not in snap.doing]:
        del abort_seen[tid]
    return moves


def stale_copies(snap: Snapshot) -> list[Move]:
    """Entries under an id that also has a more advanced entry (a re-queue that raced with
    the task's start, say) are removed: only the most advanced one runs. Marked ones are
    ``abort``'s."""
    moves = []
    for tid in _duplicated(snap):
        copies = entries(snap, tid)
        if not abort_asked(*(t for _, t in copies)):
            moves.append(
                Move(
                    tid,
                    None,
                    None,
                    None,
                    "stale entries removed",
                    stale=tuple(m for m, _ in copies[:-1]),
                )
            )
    return moves


def deadline_of(task: dict[str, Any], default_timeout: float) -> float:
    d = number(task, TaskField.DEADLINE)
    if d is not None:
        return d
    return (number(task, TaskField.DATE) or now_ms()) + default_timeout * 1000


def expire(snap: Snapshot, default_timeout: float) -> list[Move]:
    moves = []
    for source, tasks in (
        (MapName.TODOS, snap.todos),
        (MapName.PREPARED, snap.prepared),
        (MapName.DOING, snap.doing),
    ):
        for tid, task in tasks.items():
            if snap.now > deadline_of(task, default_timeout):
                step = lifecycle.expire(task, snap.now, running=source is MapName.DOING)
                moves.append(Move.of(tid, source, step, "failed: deadline", _stream_of(task)))
    return moves


def retain(done: dict[str, Any], now: int, retention: float) -> list[str]:
    out = []
    for tid, task in done.items():
        end = number(task, TaskField.END) if isinstance(task, dict) else None
        if end is None and isinstance(task, dict):
            end = number(task, TaskField.DATE)
        if end is None or now - end > retention * 1000:
            out.append(tid)
    return out


__all__ = [
    "Move",
    "Snapshot",
    "abort",
    "expire",
    "recover",
    "retain",
    "stale_copies",
    "stream_key",
    "unclaimed",
]
