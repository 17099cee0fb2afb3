"""The broker's policies, each a small function over one snapshot of the market.

- ``recover``: tasks of workers that vanished go back to ``todos`` (up to
  ``max_attempts`` assignments), then ``failed``;
- ``unclaimed``: tasks a present worker does not take in time go back to ``todos``;
- ``abort_orphans``: tasks of askers that vanished are ``aborted``;
- ``expire``: tasks past their deadline are ``failed`` with the reason;
- ``retain``: finished tasks leave the live document after ``retention`` seconds (the
  market has archived them already).

Each returns the writes to make; the broker applies them in one transaction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..protocol import ABORTED_MARK, F, MapName, State, now_ms, stream_key

DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_TIMEOUT = 600.0  # seconds a task may live when it names no deadline
DEFAULT_RETENTION = 600.0
DEFAULT_CLAIM_TIMEOUT = 30.0  # seconds a present worker has to take a task assigned to it
ABORT_GRACE = 10.0  # seconds a worker has to end a task marked aborted


@dataclass
class Snapshot:
    todos: dict[str, Any]
    prepared: dict[str, Any]
    doing: dict[str, Any]
    now: int = field(default_factory=now_ms)


@dataclass
class Move:
    """Delete ``task_id`` from ``source`` (if given) and write ``task`` to ``target``."""

    task_id: str
    source: MapName | None
    target: MapName | None
    task: dict[str, Any] | None
    why: str = ""
    drop_stream: str | None = None


def _num(task: dict[str, Any], name: str) -> float | None:
    v = task.get(name)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def ended(task: dict[str, Any], state: State, now: int, **extra: Any) -> dict[str, Any]:
    out = {k: v for k, v in task.items() if k not in (F.DELTA,)}
    out.update({F.STATE: state.value, F.END: now, **extra})
    start = _num(task, F.START) or _num(task, F.DATE)
    if start is not None:
        out[F.DURATION] = now - start
    return out


def back_to_todo(task: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in task.items()
           if k not in (F.WORKER, F.RESPONSE, F.DELTA, F.CHUNK_DATE, F.STREAM, F.START)}
    out[F.STATE] = State.TODO.value
    return out


def _stream_of(task: dict[str, Any]) -> str | None:
    s = task.get(F.STREAM)
    return s if isinstance(s, str) else None


def recover(snap: Snapshot, present: Callable[[Any], bool], max_attempts: int) -> list[Move]:
    moves = []
    for source, tasks in ((MapName.PREPARED, snap.prepared), (MapName.DOING, snap.doing)):
        for tid, task in tasks.items():
            worker = task.get(F.WORKER)
            if present(worker):
                continue
            attempts = int(_num(task, F.ATTEMPTS) or 1)
            if attempts >= max_attempts:
                moves.append(Move(tid, source, MapName.DONE, ended(
                    task, State.FAILED, snap.now,
                    **{F.ERROR: f"the worker running it vanished ({attempts} attempts)"}),
                    "failed: worker vanished too often", _stream_of(task)))
            else:
                moves.append(Move(tid, source, MapName.TODOS, back_to_todo(task),
                                  f"re-queued: worker {worker} vanished", _stream_of(task)))
    return moves


def unclaimed(snap: Snapshot, claim_timeout: float, max_attempts: int) -> list[Move]:
    """Tasks left in ``prepared`` longer than ``claim_timeout`` although their worker is
    present (hung, or advertising slots it does not have) go back to ``todos``, up to
    ``max_attempts`` assignments, then ``failed``. A live worker takes a task within
    milliseconds of its assignment."""
    moves = []
    for tid, task in snap.prepared.items():
        start = _num(task, F.START)
        if start is None or snap.now - start <= claim_timeout * 1000:
            continue
        attempts = int(_num(task, F.ATTEMPTS) or 1)
        worker = task.get(F.WORKER)
        if attempts >= max_attempts:
            moves.append(Move(tid, MapName.PREPARED, MapName.DONE, ended(
                task, State.FAILED, snap.now,
                **{F.ERROR: f"no worker took it ({attempts} attempts)"}),
                "failed: never taken"))
        else:
            moves.append(Move(tid, MapName.PREPARED, MapName.TODOS, back_to_todo(task),
                              f"re-queued: worker {worker} did not take it within "
                              f"{claim_timeout:g} s"))
    return moves


def abort_orphans(snap: Snapshot, present: Callable[[Any], bool],
                  abort_seen: dict[str, int]) -> list[Move]:
    moves = []
    for source, tasks in ((MapName.TODOS, snap.todos), (MapName.PREPARED, snap.prepared)):
        for tid, task in tasks.items():
            asker = task.get(F.ASKER)
            if task.get(F.ABORTED):
                why = "aborted by its asker"
            elif isinstance(asker, str) and not present(asker):
                why = f"aborted: asker {asker} left"
            else:
                continue
            moves.append(Move(tid, source, MapName.DONE, ended(
                task, State.ABORTED, snap.now, **{F.ABORTED: ABORTED_MARK}), why))
    for tid, task in snap.doing.items():
        asker = task.get(F.ASKER)
        if task.get(F.ABORTED):
            # The worker stops at its next token; end it ourselves if it does not. The time
            # we first saw the mark stays in memory: rewriting a running task would race
            # with its worker ending it (a concurrent write brings a deleted entry back).
            first = abort_seen.setdefault(tid, snap.now)
            if snap.now - first > ABORT_GRACE * 1000:
                moves.append(Move(tid, MapName.DOING, MapName.DONE, ended(
                    task, State.ABORTED, snap.now), "aborted: worker did not stop",
                    _stream_of(task)))
            continue
        if isinstance(asker, str) and not present(asker):
            abort_seen[tid] = snap.now
            moves.append(Move(tid, None, MapName.DOING, {**task, F.ABORTED: ABORTED_MARK},
                              f"abort asked: asker {asker} left"))
    for tid in [t for t in abort_seen if t not in snap.doing]:
        del abort_seen[tid]
    return moves


def deadline_of(task: dict[str, Any], default_timeout: float) -> float:
    d = _num(task, F.DEADLINE)
    if d is not None:
        return d
    return (_num(task, F.DATE) or now_ms()) + default_timeout * 1000


def expire(snap: Snapshot, default_timeout: float) -> list[Move]:
    moves = []
    for source, tasks in ((MapName.TODOS, snap.todos), (MapName.PREPARED, snap.prepared),
                          (MapName.DOING, snap.doing)):
        for tid, task in tasks.items():
            if snap.now > deadline_of(task, default_timeout):
                where = "running" if source == MapName.DOING else "waiting"
                moves.append(Move(tid, source, MapName.DONE, ended(
                    task, State.FAILED, snap.now,
                    **{F.ERROR: f"deadline passed while {where} (no answer in time)"}),
                    "failed: deadline", _stream_of(task)))
    return moves


def retain(done: dict[str, Any], now: int, retention: float) -> list[str]:
    out = []
    for tid, task in done.items():
        end = _num(task, F.END) if isinstance(task, dict) else None
        if end is None and isinstance(task, dict):
            end = _num(task, F.DATE)
        if end is None or now - end > retention * 1000:
            out.append(tid)
    return out


__all__ = ["Snapshot", "Move", "recover", "unclaimed", "abort_orphans", "expire", "retain",
           "stream_key"]
