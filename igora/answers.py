"""How a ``Client`` reads its answers off the market's document.

``AnswerWatcher`` follows only this client's tasks: their token streams (``streams``,
observed only while a task is read piece by piece), ``doing[id].response`` for original
workers, and ``done[id]``; it feeds each task's ``Watch`` and, once an answer is read,
removes the task from ``done`` (the market keeps it in its archive). This is the one
place that knows which maps an answer comes from; ``Client`` puts tasks on the market.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from functools import partial
from typing import Any

from pycrdt import MapEvent, Text

from .agent import Agent, Observer, discard
from .lifecycle import attempts
from .protocol import FINAL_VALUES, MapName, State, TaskField, attempt_of
from .task_handle import Watch

DROP_READ_WITHIN = 0.05  # seconds before answers read leave done, unless a new task comes first

log = logging.getLogger("igora.client")


class AnswerWatcher:
    """The answers of one client's tasks, as they arrive in ``agent``'s document."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._watches: dict[str, Watch] = {}
        self._read_ids: list[str] = []
        self._drop_due: asyncio.TimerHandle | None = None
        # The streams are observed only while a task may be read piece by piece: every
        # token of every task of the room would cost an event otherwise.
        self._streams_sub: Observer | None = None
        self._piece_watches = 0
        # doing and done: only changes of this client's tasks are handled, after the
        # transaction (the handlers read the document).
        agent.observe_keys(MapName.DOING, partial(self._watched_only, self._on_doing))
        agent.observe_keys(MapName.DONE, partial(self._watched_only, self._on_done))

    def watch(self, watch: Watch) -> None:
        """Start feeding ``watch`` with its task's answer."""
        self._watches[watch.task_id] = watch
        if watch.pieces:
            self._piece_watches += 1
            if self._streams_sub is None:
                self._streams_sub = self.agent.observe_deep(MapName.STREAMS, self._on_streams)

    def forget(self, task_id: str) -> None:
        """Stop feeding a task whose answer was read, and drop it from ``done`` soon."""
        self._unwatch(task_id)
        # Answers read leave ``done`` with this client's next task, or within
        # DROP_READ_WITHIN: one update (and one relay to every agent) for several.
        self._read_ids.append(task_id)
        if self._drop_due is None:
            try:
                self._drop_due = asyncio.get_running_loop().call_later(
                    DROP_READ_WITHIN, self.drop_read
                )
            except RuntimeError:  # no loop running (finalised elsewhere): at once
                self.drop_read()

    def drop_read(self) -> None:
        """Remove the answers read from ``done`` now (in the caller's transaction, if any)."""
        if self._drop_due is not None:
            self._drop_due.cancel()
            self._drop_due = None
        ids, self._read_ids = self._read_ids, []
        if ids and self.agent.connected:
            with self.agent.transaction():
                for task_id in ids:
                    discard(self.agent.maps[MapName.DONE], task_id)

    def _unwatch(self, task_id: str) -> None:
        watch = self._watches.pop(task_id, None)
        if watch is not None and watch.pieces:
            self._piece_watches -= 1
            if self._piece_watches == 0 and self._streams_sub is not None:
                self.agent.unobserve(self._streams_sub)
                self._streams_sub = None

    def _watched_only(
        self,
        handler: Callable[[dict[str, dict[str, Any]]], None],
        changes: dict[str, dict[str, Any]],
    ) -> None:
        ours = {k: c for k, c in changes.items() if k in self._watches}
        if ours:
            asyncio.get_running_loop().call_soon(handler, ours)

    def _on_streams(self, events: list[Any]) -> None:
        for ev in events:
            if isinstance(ev, MapEvent):
                for key, change in ev.keys.items():  # type: ignore[attr-defined]
                    value = change.get("newValue")
                    tid, attempt = attempt_of(key)
                    w = self._watches.get(tid)
                    if w is not None and isinstance(value, Text):
                        w.feed_whole(attempt, str(value))
            else:
                path = getattr(ev, "path", None)
                if not path:
                    continue
                tid, attempt = attempt_of(str(path[0]))
                w = self._watches.get(tid)
                if w is None:
                    continue
                pieces = "".join(d["insert"] for d in ev.delta if isinstance(d.get("insert"), str))
                w.feed(attempt, pieces)

    def _on_doing(self, changes: dict[str, dict[str, Any]]) -> None:
        for tid, change in changes.items():
            w = self._watches.get(tid)
            value = change.get("newValue")
            if w is not None and change.get("action") == "delete" and not w.ended:
                final = self.agent.maps[MapName.DONE].get(tid)
                if isinstance(final, dict):  # an original worker's two-step move ended
                    self._end(tid, w, final)
                continue
            if w is None or not isinstance(value, dict):
                continue
            attempt = attempts(value)
            if TaskField.STREAM in value:
                if attempt > w.attempt:
                    w.feed(attempt, "")
                continue
            response = value.get(TaskField.RESPONSE)
            if isinstance(response, str):  # an original worker: read the whole response
                w.feed_whole(attempt, response)

    def _on_done(self, changes: dict[str, dict[str, Any]]) -> None:
        for tid, change in changes.items():
            w = self._watches.get(tid)
            value = change.get("newValue")
            if w is None or w.ended or not isinstance(value, dict):
                continue
            self._end(tid, w, value)

    def _end(self, tid: str, w: Watch, value: dict[str, Any]) -> None:
        """Take ``done[tid]`` as the task's end, unless it does not look like one.

        Workers and brokers move a task to ``done`` in one transaction, so an entry in
        ``done`` while the task is still in ``todos``/``prepared``/``doing`` is either a
        forgery or the first half of an original worker's two-step move: wait (the
        ``doing`` deletion calls this again)."""
        state = value.get(TaskField.STATE)
        if state not in FINAL_VALUES and not value.get(TaskField.ABORTED):
            log.warning("task %s: ignoring an entry in done with state %r", tid, state)
            return
        if any(tid in self.agent.maps[m] for m in (MapName.TODOS, MapName.PREPARED, MapName.DOING)):
            log.info(
                "task %s: an end was written while it still runs; waiting for the move to complete",
                tid,
            )
            return
        response = value.get(TaskField.RESPONSE)
        if state == State.DONE.value and isinstance(response, str):
            attempt = max(w.attempt, 1)
            if not response.startswith(w.delivered):
                w.feed(attempt + 1, response)
            else:
                w.feed(attempt, response[len(w.delivered) :])
        w.ended = True
        w.queue.put_nowait(value)
