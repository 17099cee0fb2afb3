"""The ``board`` document of a v3 room: what the web view and ``igora status`` show of
the tasks (docs/protocol-v3.md §4, §12.8), written by the broker lease holder.

Every task's content (prompt, answer) is end-to-end encrypted and never reaches the
broker in clear; the board holds what the broker reads in clear anyway: counts by state
and by model, and the last ``RECENT`` tasks with their model, state, asker and worker
keys, attempt, tokens and times. Nothing of a task's text is copied, not even an error
text the worker wrote (only its code).

Shape: the top-level map ``board`` holds one key, ``summary``, rewritten whole at most
once per ``EVERY`` seconds, and only when it changed. One key rewritten is one Yjs item
replacing the last: a garbage-collected document stays the size of one summary
(~``RECENT`` × 270 B) however long the room runs, in the broker, in the market (which
keeps this document through a ``Doc``, ``doclog.DocLog(rewritten=True)``) and in every
reader. Several keys rewritten in turns would leave one deleted item per write.

``summary``:

| field | what |
|---|---|
| ``at`` | ms epoch of this summary |
| ``since`` | ms epoch from which ``done``, ``failed``, ``aborted`` count (the lease) |
| ``epoch`` | the broker lease's epoch |
| ``counts`` | ``waiting``, ``running`` (now), ``done``, ``failed``, ``aborted`` (since) |
| ``perMinute`` | ``done`` and ``tokens`` (completion) over the last 60 s |
| ``models`` | model -> ``{waiting, running, done}`` (at most ``MAX_MODELS``) |
| ``tasks`` | the last ``RECENT`` tasks, live first then finished, newest first (``row``) |

A task's row: ``id``, ``model``, ``state`` (``waiting``, ``running``, ``done``, ``failed``,
``aborted``), ``asker`` and ``worker`` (keys), ``attempt``, ``date``, ``start``, ``end``
(ms), ``tokens``, ``promptTokens`` (of a task done), ``errorCode`` (of one failed).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from ..protocol import number
from ..summary import usage_counts
from .tasks import FINAL_RUNS, Header, RunField, RunState, Status, StatusState

BOARD = "board"  # the document, and its top-level map
SUMMARY = "summary"  # the map's one key
EVERY = 1.0
"""Seconds between two writes of the board at least (protocol-v3.md §4)."""
RECENT = 50
"""Tasks listed in a summary."""
MAX_MODELS = 50
"""Models counted in a summary (a room with more shows the first seen)."""
WINDOW = 60_000
"""ms over which ``perMinute`` counts (whole seconds: the oldest second of the window
counts whole)."""
MAX_SECONDS = 600
"""Seconds of completions kept at most (``perMinute`` reads the last 60; a worker whose
clock runs ahead could write ends in seconds the window has not reached yet)."""

WAITING, RUNNING = "waiting", "running"
ENDED = ("done", "failed", "aborted")


def _int(value: Any) -> int | None:
    n = number(value)
    return int(n) if n is not None and 0 <= n < 2**53 else None


def row(
    header: dict[str, Any], status: dict[str, Any] | None, run: dict[str, Any] | None
) -> dict[str, Any]:
    """One task as the board lists it, from the broker's reads: its signed header, its
    status in ``in/<asker>`` and its worker's entry in ``w/<worker>.runs``."""
    status = status or {}
    run = run or {}
    state_of = status.get(Status.STATE)
    run_state = run.get(RunField.STATE)
    if state_of in (StatusState.FAILED.value, StatusState.ABORTED.value):
        state = str(state_of)
    elif state_of == StatusState.ASSIGNED.value and run_state in FINAL_RUNS:
        state = str(run_state)
    elif state_of == StatusState.ASSIGNED.value and run_state in (
        RunState.DOING.value,
        RunState.HANDBACK.value,
    ):
        state = RUNNING
    else:
        state = WAITING  # not assigned yet, re-queued, or assigned and not started
    prompt_tokens, tokens = usage_counts(run)
    worker = status.get(Status.WORKER)
    code = status.get(Status.ERROR_CODE) or run.get(RunField.ERROR_CODE)
    return {
        "id": str(header.get(Header.ID)),
        "model": str(header.get(Header.MODEL))[:200],
        "state": state,
        "asker": header.get(Header.ASKER),
        "worker": worker if isinstance(worker, str) else None,
        "attempt": _int(status.get(Status.ATTEMPT)) or 0,
        "date": _int(header.get(Header.DATE)),
        "start": _int(run.get(RunField.START)) or _int(status.get(Status.START)),
        "end": _int(run.get(RunField.END)) or _int(status.get(Status.END)),
        "tokens": tokens if run_state == RunState.DONE.value else None,
        "promptTokens": prompt_tokens if run_state == RunState.DONE.value else None,
        "errorCode": code if isinstance(code, str) and state in ("failed", "aborted") else None,
    }


class BoardKeeper:
    """What the broker remembers for the board: the rows of live tasks (as of its last
    turn), the last ``RECENT`` finished ones, counts since ``since`` and the completions
    of the last minute, per second. Its memory is bounded whatever the number and the
    rate of tasks served: a finished task is remembered (to count it once) only while
    its header is read, and a minute of completions is 60 counts (a list of the last
    10,000 completions and ids grew the broker by ~3 MB over its first 10,000 tasks,
    docs/benchmarks.md "Soak, protocol 3")."""

    def __init__(self, since: int, epoch: int = 0) -> None:
        self.since = since
        self.epoch = epoch
        self.live: dict[str, dict[str, Any]] = {}
        self.finished: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._counted: set[str] = set()  # tids counted as ended, their header still read
        self.ended = dict.fromkeys(ENDED, 0)
        self.done_by_model: dict[str, int] = {}
        self._seconds: dict[int, list[int]] = {}  # second of the end -> [done, tokens]
        self._written: dict[str, Any] | None = None
        self._written_at = -1e18

    def turn(self, rows: dict[str, dict[str, Any]]) -> None:
        """The rows of every task the broker read this turn; a task whose row is final
        is counted once and moves to the finished list."""
        self.live = {}
        for tid, r in rows.items():
            if r["state"] in ENDED:
                self._finish(tid, r)
            else:
                self.live[tid] = r
        self._counted.intersection_update(rows.keys())  # a header gone is not read again

    def gone(
        self,
        tid: str,
        last: dict[str, Any] | None,
        run: dict[str, Any] | None,
        status: dict[str, Any] | None = None,
    ) -> None:
        """A task's header left (its asker read the end): its last row, updated with
        its ``status`` (its row may be from the turn that assigned it, read before the
        assignment: a short task ends before the next turn) and its worker's run (which
        may have ended in the same batch as the header left)."""
        if tid in self._counted or last is None:
            return
        r = dict(last)
        if status:
            worker = status.get(Status.WORKER)
            if isinstance(worker, str):
                r["worker"] = worker
            r["attempt"] = _int(status.get(Status.ATTEMPT)) or r["attempt"]
            r["start"] = r["start"] or _int(status.get(Status.START))
        if run:
            prompt_tokens, tokens = usage_counts(run)
            state = run.get(RunField.STATE)
            r["state"] = state if state in FINAL_RUNS else r["state"]
            r["start"] = _int(run.get(RunField.START)) or r["start"]
            r["end"] = _int(run.get(RunField.END)) or r["end"]
            if state == RunState.DONE.value:
                r["tokens"], r["promptTokens"] = tokens, prompt_tokens
        if r["state"] not in ENDED:
            r["state"] = "aborted"  # its asker left before an end was written
        self.live.pop(tid, None)
        self._finish(tid, r)

    def _finish(self, tid: str, r: dict[str, Any]) -> None:
        if tid in self._counted:
            if tid in self.finished:
                self.finished[tid] = r  # its row may gain what came later (tokens)
            return
        self._counted.add(tid)
        self.finished[tid] = r
        while len(self.finished) > RECENT:
            self.finished.popitem(last=False)
        self.ended[r["state"]] += 1
        if r["state"] == "done":
            model = r["model"]
            if model in self.done_by_model or len(self.done_by_model) < MAX_MODELS:
                self.done_by_model[model] = self.done_by_model.get(model, 0) + 1
            second = self._seconds.setdefault((r["end"] or 0) // 1000, [0, 0])
            second[0] += 1
            second[1] += r["tokens"] or 0
            if len(self._seconds) > MAX_SECONDS:
                del self._seconds[min(self._seconds)]

    def summary(self, now: int) -> dict[str, Any]:
        """The board's ``summary`` as of ``now`` (ms)."""
        counts = {WAITING: 0, RUNNING: 0, **self.ended}
        models: dict[str, dict[str, int]] = {
            m: {WAITING: 0, RUNNING: 0, "done": n} for m, n in self.done_by_model.items()
        }
        for r in self.live.values():
            counts[r["state"]] += 1
            m = models.get(r["model"])
            if m is None and len(models) < MAX_MODELS:
                m = models[r["model"]] = {WAITING: 0, RUNNING: 0, "done": 0}
            if m is not None:
                m[r["state"]] += 1
        first = (now - WINDOW) // 1000
        for second in [s for s in self._seconds if s < first]:
            del self._seconds[second]
        done = sum(n for n, _ in self._seconds.values())
        tokens = sum(t for _, t in self._seconds.values())
        live = sorted(self.live.values(), key=lambda r: -(r["date"] or 0))
        finished = sorted(self.finished.values(), key=lambda r: -(r["end"] or 0))
        return {
            "at": now,
            "since": self.since,
            "epoch": self.epoch,
            "counts": counts,
            "perMinute": {"done": done, "tokens": tokens},
            "models": models,
            "tasks": (live + finished)[:RECENT],
        }

    def due(self, now: int, clock: float) -> dict[str, Any] | None:
        """The summary to write now (``clock``: monotonic seconds), if ``EVERY`` s
        passed since the last write and it changed; else None."""
        if clock - self._written_at < EVERY:
            return None
        s = self.summary(now)
        if self._written is not None and {**s, "at": 0} == {**self._written, "at": 0}:
            return None
        self._written, self._written_at = s, clock
        return s


def read(summary: Any) -> dict[str, Any] | None:
    """A board ``summary`` as read from the document (anyone may have written a broken
    one while it held the lease): the summary if its shape holds, else None."""
    if not isinstance(summary, dict):
        return None
    counts, tasks = summary.get("counts"), summary.get("tasks")
    if not isinstance(counts, dict) or not isinstance(tasks, list):
        return None
    return summary


__all__ = ["BOARD", "EVERY", "RECENT", "SUMMARY", "BoardKeeper", "read", "row"]
