"""One task a worker runs: why it stopped, and the state of its answer's stream."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from pycrdt import Text

from .. import lifecycle
from ..agent import Agent
from ..capabilities import required
from ..engines.base import Embeddings, Engine, Finish, Request
from ..protocol import MapName, TaskField, now_ms

STALL_SETTLE = 0.2  # seconds to read the market's news after this process stood still

COMPAT_INTERVAL = 0.25
COMPAT_GROWTH = 1.25
STREAM_INTERVAL = 0.025  # seconds: pieces arriving faster are written together (the first at once)


class Stop(str, Enum):
    """Why a running task stopped before its engine ended it."""

    ABORTED = "aborted"  # the abort mark, on any entry under its id
    LOST = "lost"  # taken away: its doing entry moved or names another worker
    DELETED = "deleted"  # its doing entry deleted, moved nowhere (Worker._after_transaction)
    DEADLINE = "deadline"  # it passed its deadline while running


@dataclass
class Running:
    task_id: str
    attempt: int
    job: asyncio.Task[None] | None = None
    stop_reason: Stop | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def halt(self, reason: Stop) -> None:
        self.stop_reason = reason
        self.stop.set()


class Pieces:
    """An answer written as it comes: pieces are held and written (``_write``) at most
    every STREAM_INTERVAL, the first at once. ``AnswerStream`` writes them to a v2 room,
    the v3 worker to its run document."""

    HOLD_LAST = False
    """Whether the pieces that come with the engine's end (``add(piece, last=True)``) are
    held for the run's end instead of written now: a v3 run writes them in its final
    chunk, in the same update (one chunk, transaction and frame fewer per short answer)."""

    def __init__(self) -> None:
        # The answer as its pieces (joined when read: ``+=`` on an attribute copies the
        # whole string at each piece), and its length so far.
        self._pieces: list[str] = []
        self._length = 0
        self.held = ""  # pieces not written yet
        self.last_write = 0.0

    @property
    def response(self) -> str:
        """The whole answer so far."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def add(self, piece: str, last: bool = False) -> None:
        """A piece of the answer: written now if the last write is old enough (``last``:
        the engine's end came with it; held for the end if ``HOLD_LAST``)."""
        self._pieces.append(piece)
        self._length += len(piece)
        self.held += piece
        if last and self.HOLD_LAST:
            return
        if time.monotonic() - self.last_write >= STREAM_INTERVAL:
            self.flush()

    def wait(self) -> float | None:
        """Seconds until the held pieces are due, None when none is held."""
        return self.last_write + STREAM_INTERVAL - time.monotonic() if self.held else None

    def flush(self) -> None:
        """Write the held pieces."""
        now = time.monotonic()
        self.last_write = now
        piece, self.held = self.held, ""
        self._write(piece, now)

    def _write(self, piece: str, now: float) -> None:
        raise NotImplementedError


class AnswerStream(Pieces):
    """The answer of one running task, as written to a v2 room: pieces are appended to
    its ``Y.Text`` at most every STREAM_INTERVAL (the first at once), and, while original
    readers are in the room, its doing entry is refreshed at most every ``compat_interval``
    and only when the answer grew by COMPAT_GROWTH (docs/protocol.md, 4.3)."""

    def __init__(
        self,
        agent: Agent,
        task_id: str,
        key: str,
        compat_interval: float,
        original_readers: Callable[[float], bool],
    ) -> None:
        super().__init__()
        self.agent = agent
        self.task_id = task_id
        self.key = key
        self.compat_interval = compat_interval
        self.original_readers = original_readers
        self.last_refresh = 0.0
        self.refreshed_len = 0

    def _write(self, piece: str, now: float) -> None:
        """Append the held pieces to the stream; refresh the doing entry when due."""
        with self.agent.transaction():
            # Look the stream up at each write, never keep it across awaits: writing to a
            # Text another peer replaced or deleted crashes pycrdt (use after free). Gone
            # or replaced: the final answer in done still carries the whole text.
            text = self.agent.maps[MapName.STREAMS].get(self.key)
            if isinstance(text, Text):
                text += piece
            if (
                now - self.last_refresh >= self.compat_interval
                and self._length >= self.refreshed_len * COMPAT_GROWTH
                and self.original_readers(now)
            ):
                self._refresh(piece)
                self.last_refresh, self.refreshed_len = now, self._length

    def _refresh(self, piece: str) -> None:
        doing = self.agent.maps[MapName.DOING]
        current = doing.get(self.task_id)
        if not isinstance(current, dict) or current.get(TaskField.WORKER) != self.agent.id:
            return
        doing[self.task_id] = lifecycle.refresh(current, self.response, piece, now_ms())


async def coalesced(
    engine: Engine, request: Request
) -> AsyncGenerator[tuple[list[str], Finish | None]]:
    """The engine's stream, coalesced: every piece ready at once comes in one batch, with
    the engine's ``Finish`` when it is ready too (else None)."""
    queue: asyncio.Queue[Any] = asyncio.Queue()

    async def produce() -> None:
        try:
            async for item in engine.generate(request):
                queue.put_nowait(item)
                if isinstance(item, Finish):
                    return
        except Exception as exc:  # handed to the consumer
            queue.put_nowait(exc)

    producer = asyncio.create_task(produce())
    try:
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, Finish):
                yield [], item
                return
            batch = [item]
            while not queue.empty():
                nxt = queue.get_nowait()
                if isinstance(nxt, str):
                    batch.append(nxt)
                    continue
                if isinstance(nxt, Finish):
                    yield batch, nxt
                    return
                yield batch, None
                raise nxt
            yield batch, None
    finally:
        producer.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await producer


async def stream_chat(
    engine: Engine,
    run: Running,
    task: dict[str, Any],
    request: Request,
    answer: Pieces,
    heartbeat: float,
) -> Finish | None:
    """Run a chat task: the engine's pieces go to ``answer`` until the engine ends
    (its Finish), or the task is stopped (None). ``heartbeat``: the worker's, in s."""
    tokens = coalesced(engine, request)
    deadline = task.get(TaskField.DEADLINE)
    stop_wait = asyncio.create_task(run.stop.wait())
    last_item = time.monotonic()
    nxt: asyncio.Future[Any] | None = None
    try:
        while True:
            if nxt is None:
                nxt = asyncio.ensure_future(tokens.__anext__())
            await asyncio.wait(
                {nxt, stop_wait}, timeout=answer.wait(), return_when=asyncio.FIRST_COMPLETED
            )
            if answer.held and not nxt.done() and not stop_wait.done():
                answer.flush()
                continue
            if not nxt.done():
                nxt.cancel()
                with contextlib.suppress(BaseException):
                    await nxt
                return None
            try:
                item = nxt.result()
            except StopAsyncIteration:
                return None
            nxt = None
            if time.monotonic() - last_item > 2 * heartbeat:
                # Paused (or starved) long enough to be counted gone: the task may
                # have moved on. Read what arrived before writing anything.
                await asyncio.sleep(STALL_SETTLE)
                if run.stop_reason:
                    return None
            last_item = time.monotonic()
            pieces: list[str] = item[0]
            finish: Finish | None = item[1]
            if pieces:
                answer.add("".join(pieces), last=finish is not None)
                if deadline and now_ms() > float(deadline):
                    run.halt(Stop.DEADLINE)
                    return None
            if finish is not None:
                return finish
    finally:
        stop_wait.cancel()
        await tokens.aclose()


async def embed_inputs(
    engine: Engine, run: Running, task: dict[str, Any], model: str | None
) -> Embeddings | None:
    """Run an embed task; None (no answer) if the task is stopped first."""
    dims = task.get(TaskField.DIMENSIONS)
    job = asyncio.ensure_future(
        engine.embed(
            list(task[TaskField.INPUTS]),
            model=model,
            dimensions=int(dims) if isinstance(dims, (int, float)) else None,
        )
    )
    stop_wait = asyncio.ensure_future(run.stop.wait())
    try:
        await asyncio.wait({job, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop_wait.cancel()
    if not job.done():
        job.cancel()
        with contextlib.suppress(BaseException):
            await job
        return None
    return job.result()


def request_for(engine: Engine, task: dict[str, Any], max_tokens: int) -> Request:
    """The engine request of a task: on the task's model if this worker serves it, else
    on its first model that offers what the task needs."""
    request = Request.from_task(task)
    if request.max_tokens is None:
        request.max_tokens = max_tokens
    if request.model not in {m.name for m in engine.models()}:
        request.model = engine.model_for(required(task))
    return request
