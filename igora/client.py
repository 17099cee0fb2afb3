"""``igora.Client``: put tasks on the market and read their answers.

    async with Client() as client:                 # ws://localhost:1234, room "market"
        print(await client.chat("Bonjour"))
        async for piece in await client.chat("Raconte une histoire", stream=True):
            print(piece, end="")

``SyncClient`` offers the same without ``async``. Answers are read from the task's token
stream (``streams``), from ``doing[id].response`` for original workers, and from
``done[id]``; once read, the client removes its task from ``done`` (the market keeps it
in its archive).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from pycrdt import MapEvent, Text

from .agent import Agent, Observer, discard
from .capabilities import unservable
from .config import market_address
from .errors import NoWorkerError, TaskFailed
from .protocol import (
    ABORTED_MARK,
    FINAL_VALUES,
    PROTOCOL_VERSION,
    TEXT_STYLE,
    A,
    AgentType,
    F,
    MapName,
    Peer,
    State,
    TaskKind,
    new_task_id,
    now_ms,
    validate_task,
)
from .sync_client import SyncClient
from .task_handle import RESTART_TEXT, Answer, Restart, Task, Watch, attempt_of

DEFAULT_TIMEOUT = 300.0
DROP_READ_WITHIN = 0.05  # seconds before answers read leave done, unless a new task comes first

log = logging.getLogger("igora.client")

__all__ = [
    "DEFAULT_TIMEOUT",
    "RESTART_TEXT",
    "Answer",
    "Client",
    "Restart",
    "SyncClient",
    "Task",
]


class Client:
    """An asker on the market."""

    def __init__(
        self,
        market: str | None = None,
        room: str | None = None,
        *,
        name: str = "igora-client",
        style: str = TEXT_STYLE,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = 10.0,
    ) -> None:
        self.address = market_address(market, room)
        self.timeout = timeout
        self.agent = Agent(
            self.address,
            type=AgentType.CLIENT.value,
            name=name,
            style=style,
            connect_timeout=connect_timeout,
        )
        self._watches: dict[str, Watch] = {}
        self._read_ids: list[str] = []
        self._drop_due: asyncio.TimerHandle | None = None
        # The streams are observed only while a task may be read piece by piece: every
        # token of every task of the room would cost an event otherwise.
        self._streams_sub: Observer | None = None
        self._piece_watches = 0
        # doing and done: only changes of this client's tasks are handled, after the
        # transaction (the handlers read the document).
        self.agent.observe_keys(MapName.DOING, partial(self._watched_only, self._on_doing))
        self.agent.observe_keys(MapName.DONE, partial(self._watched_only, self._on_done))

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        await self.agent.start()

    async def close(self) -> None:
        self._drop_read()
        await self.agent.stop()

    # ------------------------------------------------------------------ market view
    def workers(self) -> list[Any]:
        return [p for p in self.agent.peers() if p.type == AgentType.WORKER.value]

    def models(self) -> list[str]:
        """Models served by the workers on the market now."""
        names: set[str] = set()
        for w in self.workers():
            names.update(w.models)
        return sorted(names)

    async def wait_for_worker(
        self, model: str | None, timeout: float, task: dict[str, Any] | None = None
    ) -> None:
        """Wait until a worker that could serve ``task`` (or any task for ``model``) is on
        the market; NoWorkerError naming the missing model or capability after ``timeout``."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        probe = task or {F.ID: "probe", F.PROTOCOL: PROTOCOL_VERSION, F.MODEL: model, F.PROMPT: ""}
        while True:
            why = unservable(probe, self.workers())
            if why is None:
                return
            if loop.time() >= end:
                raise NoWorkerError(
                    model, self.models(), why.missing, why.reason if why.missing else None
                )
            await asyncio.sleep(0.1)

    # ------------------------------------------------------------------ observers
    def _watched_only(
        self,
        handler: Callable[[dict[str, dict[str, Any]]], None],
        changes: dict[str, dict[str, Any]],
    ) -> None:
        ours = {k: c for k, c in changes.items() if k in self._watches}
        if ours:
            asyncio.get_running_loop().call_soon(handler, ours)

    def _watch(self, watch: Watch) -> None:
        self._watches[watch.task_id] = watch
        if watch.pieces:
            self._piece_watches += 1
            if self._streams_sub is None:
                self._streams_sub = self.agent.observe_deep(MapName.STREAMS, self._on_streams)

    def _unwatch(self, task_id: str) -> None:
        watch = self._watches.pop(task_id, None)
        if watch is not None and watch.pieces:
            self._piece_watches -= 1
            if self._piece_watches == 0 and self._streams_sub is not None:
                self.agent.unobserve(self._streams_sub)
                self._streams_sub = None

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
            attempt = (
                int(value.get(F.ATTEMPTS) or 1)
                if isinstance(value.get(F.ATTEMPTS), (int, float))
                else 1
            )
            if F.STREAM in value:
                if attempt > w.attempt:
                    w.feed(attempt, "")
                continue
            response = value.get(F.RESPONSE)
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
        state = value.get(F.STATE)
        if state not in FINAL_VALUES and not value.get(F.ABORTED):
            log.warning("task %s: ignoring an entry in done with state %r", tid, state)
            return
        if any(tid in self.agent.maps[m] for m in (MapName.TODOS, MapName.PREPARED, MapName.DOING)):
            log.info(
                "task %s: an end was written while it still runs; waiting for the move to complete",
                tid,
            )
            return
        response = value.get(F.RESPONSE)
        if state == State.DONE.value and isinstance(response, str):
            attempt = max(w.attempt, 1)
            if not response.startswith(w.delivered):
                w.feed(attempt + 1, response)
            else:
                w.feed(attempt, response[len(w.delivered) :])
        w.ended = True
        w.queue.put_nowait(value)

    # ------------------------------------------------------------------ tasks
    def _task(
        self,
        prompt: str | list[dict[str, str]],
        *,
        model: str | None,
        system: str | None,
        temperature: float | None,
        top_p: float | None,
        seed: int | None,
        max_tokens: int | None,
        stop: str | list[str] | None,
        timeout: float,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        tid = new_task_id()
        task: dict[str, Any] = {
            F.ID: tid,
            F.PROTOCOL: PROTOCOL_VERSION,
            F.ASKER: self.agent.id,
            F.ASKER_NAME: self.agent.name,
            F.CLIENT_ID: self.agent.awareness.client_id,
            F.STYLE: TEXT_STYLE,
            F.STATE: State.TODO.value,
            F.DATE: now_ms(),
            F.DEADLINE: now_ms() + int(timeout * 1000),
            F.SYSTEM_PROMPT: system or "",
        }
        if isinstance(prompt, str):
            task[F.PROMPT] = prompt
        elif prompt is not None:
            task[F.MESSAGES] = [dict(m) for m in prompt]
        optional = {
            F.MODEL: model,
            F.TEMPERATURE: temperature,
            F.TOP_P: top_p,
            F.SEED: seed,
            F.MAX_TOKENS: max_tokens,
            F.STOP: stop,
            **(extra or {}),
        }
        task.update({k: v for k, v in optional.items() if v is not None})
        return validate_task(task)

    async def submit(
        self,
        prompt: str | list[dict[str, str]],
        *,
        model: str | None = None,
        system: str | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        max_tokens: int | None = None,
        stop: str | list[str] | None = None,
        timeout: float | None = None,
        wait_worker: float = 5.0,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        response_format: dict[str, Any] | None = None,
        n: int | None = None,
        logprobs: bool | None = None,
        top_logprobs: int | None = None,
        _pieces: bool = True,
        _extra: dict[str, Any] | None = None,
    ) -> Task:
        """Put a task on the market and return its handle (raises NoWorkerError if no
        worker serving ``model`` with what the task needs (tools, a response format,
        n > 1, logprobs) shows up within ``wait_worker`` seconds).

        ``tools``, ``tool_choice`` and ``response_format`` take OpenAI's shapes."""
        timeout = timeout or self.timeout
        extra = {
            F.TOOLS: tools,
            F.TOOL_CHOICE: tool_choice,
            F.RESPONSE_FORMAT: response_format,
            F.N: n,
            F.LOGPROBS: logprobs,
            F.TOP_LOGPROBS: top_logprobs,
            **(_extra or {}),
        }
        task = self._task(
            prompt,
            model=model,
            system=system,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            max_tokens=max_tokens,
            stop=stop,
            timeout=timeout,
            extra=extra,
        )
        await self.wait_for_worker(model, wait_worker, task)
        watch = Watch(task[F.ID], pieces=_pieces)
        self._watch(watch)
        with self.agent.transaction():
            self._drop_read()
            self.agent.maps[MapName.TODOS][task[F.ID]] = task
        return Task(self, task, watch, timeout)

    async def chat(
        self,
        prompt: str | list[dict[str, str]],
        *,
        stream: bool = False,
        **options: Any,
    ) -> Any:
        """Ask and return the answer's text, or with ``stream=True`` an async iterator of
        text pieces (a ``Restart`` piece marks a restart on another worker).

        Options: ``model``, ``system``, ``temperature``, ``top_p``, ``seed``,
        ``max_tokens``, ``stop``, ``timeout``, and ``tools``, ``tool_choice``,
        ``response_format``, ``n``, ``logprobs``, ``top_logprobs`` (OpenAI's shapes).
        With ``tools``, ``n`` > 1 or ``logprobs`` the result is the whole ``Answer``
        (``.text``, ``.tool_calls``, ``.choices``, ``.logprobs``), not only its text."""
        task = await self.submit(prompt, _pieces=stream, **options)
        if stream:
            return task.stream()
        answer = await task.result()
        if options.get("tools") or (options.get("n") or 1) > 1 or options.get("logprobs"):
            return answer
        return answer.text

    async def embed(
        self,
        inputs: str | list[str],
        *,
        model: str | None = None,
        dimensions: int | None = None,
        timeout: float | None = None,
        wait_worker: float = 5.0,
    ) -> list[list[float]]:
        """One vector per input text (a worker whose model offers ``embed`` computes them)."""
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        task = await self.submit(
            None,  # type: ignore[arg-type]  # an embed task has inputs, not a prompt
            model=model,
            timeout=timeout,
            wait_worker=wait_worker,
            _pieces=False,
            _extra={F.KIND: TaskKind.EMBED.value, F.INPUTS: texts, F.DIMENSIONS: dimensions},
        )
        answer = await task.result()
        vectors = answer.task.get(F.EMBEDDINGS)
        if not isinstance(vectors, list) or len(vectors) != len(texts):
            raise TaskFailed(f"task {task.id}: the worker sent no embeddings", answer.task)
        return [[float(x) for x in v] for v in vectors]

    def abort(self, task_id: str) -> None:
        """Ask for a task to stop; it ends ``aborted``."""
        m = self.agent.maps
        with self.agent.transaction():
            for source in (MapName.TODOS, MapName.PREPARED, MapName.DOING):
                value = m[source].get(task_id)
                if isinstance(value, dict) and not value.get(F.ABORTED):
                    m[source][task_id] = {**value, F.ABORTED: ABORTED_MARK}

    def _forget(self, task_id: str) -> None:
        self._unwatch(task_id)
        # Answers read leave ``done`` with this client's next task, or within
        # DROP_READ_WITHIN: one update (and one relay to every agent) for several.
        self._read_ids.append(task_id)
        if self._drop_due is None:
            try:
                self._drop_due = asyncio.get_running_loop().call_later(
                    DROP_READ_WITHIN, self._drop_read
                )
            except RuntimeError:  # no loop running (finalised elsewhere): at once
                self._drop_read()

    def _drop_read(self) -> None:
        if self._drop_due is not None:
            self._drop_due.cancel()
            self._drop_due = None
        ids, self._read_ids = self._read_ids, []
        if ids and self.agent.connected:
            with self.agent.transaction():
                for task_id in ids:
                    discard(self.agent.maps[MapName.DONE], task_id)

    # ------------------------------------------------------------------ for the gateway
    # and the web page: what they read of the market, without reaching into the agent.
    @property
    def id(self) -> str:
        """This client's agent id on the market (tasks name it as their asker)."""
        return self.agent.id

    @property
    def name(self) -> str:
        return self.agent.name

    @property
    def connected(self) -> bool:
        """Connected to the market and its document synced."""
        return self.agent.connected and self.agent.synced.is_set()

    def connected_for(self) -> float:
        """Seconds since the last (re)connection to the market."""
        return time.monotonic() - self.agent.connected_at

    async def start(self) -> None:
        """Start connecting without waiting for the market (``connect`` waits); the
        connection is retried in the background until ``close``."""
        await self.agent.start(wait=False)

    async def wait_synced(self, timeout: float) -> bool:
        """Whether the market's document arrived within ``timeout`` seconds."""
        try:
            await asyncio.wait_for(self.agent.synced.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def set_heartbeat(self, seconds: float) -> None:
        """Refresh this client's awareness every ``seconds`` (peers count it gone after
        three missed refreshes)."""
        self.agent.heartbeat = seconds
        self.agent.set_state(**{A.HEARTBEAT: seconds})

    def peers(self) -> list[Peer]:
        """Every other agent on the market now (workers, brokers, askers)."""
        return self.agent.peers()

    def own_state(self) -> tuple[int, dict[str, Any]]:
        """This client's awareness id and the state it announces."""
        return self.agent.awareness.client_id, self.agent.local_state

    def worker_of(self, task_id: str) -> str | None:
        """The id of the worker running (or that ran) a task still in the document."""
        for m in (MapName.DOING, MapName.DONE):
            value = self.agent.maps[m].get(task_id)
            if isinstance(value, dict) and isinstance(value.get(F.WORKER), str):
                return value[F.WORKER]  # type: ignore[no-any-return]
        return None

    def entries(self, name: MapName) -> list[tuple[str, Any]]:
        """The entries of one of the room's task maps, as a list (a copy)."""
        return list(self.agent.maps[name].items())

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` after every change of the room (document or awareness)."""
        self.agent.on_change(callback)

    def on_entries(
        self, name: MapName, callback: Callable[[dict[str, dict[str, Any]]], None]
    ) -> None:
        """Call ``callback`` with the changed keys of a task map (``{key: {"action",
        "newValue", ...}}``), after each transaction that changes it."""
        self.agent.observe_keys(name, callback)
