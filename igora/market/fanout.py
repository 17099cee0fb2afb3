"""How a room sends: one outbox and one writer task per connection.

pycrdt-websocket sends every message to every connection in a task of its own (one task
per message and per receiver), and echoes each document update to the connection it
came from. With many agents that is most of the market's time (profiled: task creation,
ASGI send and compression of tiny frames per receiver). Here a message is appended to
each receiver's outbox (no task), the sender of a document update is skipped (it has the
update already), and a writer drains its outbox: what piled up while it was sending
goes out coalesced, consecutive document updates merged into one update and
consecutive awareness updates into one awareness message. A quiet room sends each
message at once; a busy one sends fewer, larger frames. A room of protocol 3 gives its
outbox its own ``coalesce`` (``igora.market.v3.connection``: one ``BATCH`` frame).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Protocol

from pycrdt import (
    YMessageType,
    YSyncMessageType,
    create_awareness_message,
    create_update_message,
    merge_updates,
)

from ..lib0 import chunk_at, uint_at, uint_bytes

MAX_QUEUED_BYTES = 64 * 1024 * 1024
"""A connection that lets this much pile up unsent (it does not read) is dropped."""

log = logging.getLogger("igora.market")


def _payload(message: bytes, at: int) -> bytes:
    """The length-prefixed bytes at ``at`` of a message the market checked or made."""
    return chunk_at(message, at)[0]


def _is_update(message: bytes) -> bool:
    return (
        len(message) > 1
        and message[0] == YMessageType.SYNC
        and message[1] == YSyncMessageType.SYNC_UPDATE
    )


def _is_awareness(message: bytes) -> bool:
    return bool(message) and message[0] == YMessageType.AWARENESS


def _merge_awareness(messages: list[bytes]) -> bytes:
    if len(messages) == 1:
        return messages[0]
    count = 0
    entries = []
    for m in messages:
        payload = _payload(m, 1)
        n, at = uint_at(payload, 0)
        count += n
        entries.append(payload[at:])
    return create_awareness_message(uint_bytes(count) + b"".join(entries))


@functools.lru_cache(maxsize=16)
def _merge_queued(messages: tuple[bytes, ...]) -> bytes:
    """``_merge_awareness`` for what waits in an outbox. The connections of a room that
    fall behind hold the same run of broadcast messages (the same objects): merged once,
    not once per connection. (A tuple of bytes hashes fast: each bytes object keeps its
    hash, and equal keys are the same objects.)"""
    return _merge_awareness(list(messages))


def coalesce(batch: list[bytes]) -> Iterator[bytes]:
    """The frames to send for ``batch``, in order, runs of updates merged."""
    i = 0
    while i < len(batch):
        j = i + 1
        if _is_update(batch[i]):
            while j < len(batch) and _is_update(batch[j]):
                j += 1
            if j - i > 1:
                yield create_update_message(merge_updates(*(_payload(m, 2) for m in batch[i:j])))
            else:
                yield batch[i]
        elif _is_awareness(batch[i]):
            while j < len(batch) and _is_awareness(batch[j]):
                j += 1
            yield _merge_queued(tuple(batch[i:j])) if j - i > 1 else batch[i]
        else:
            yield batch[i]
        i = j


class Outbox:
    """The messages waiting for one connection, and the task that writes them.

    ``coalesce`` turns what piled up into the frames to write: y-websocket's by default;
    a v3 connection packs them into one ``BATCH`` (igora.v3.outbox)."""

    def __init__(
        self,
        send: Callable[[bytes], Awaitable[None]],
        name: str,
        coalesce: Callable[[list[bytes]], Iterable[bytes]] = coalesce,
    ) -> None:
        self._send = send
        self._name = name
        self._coalesce = coalesce
        self._queue: deque[bytes] = deque()
        self._bytes = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.closed = False
        self.frames = 0  # sent, after coalescing

    def put(self, message: bytes) -> None:
        if self.closed:
            return
        self._queue.append(message)
        self._bytes += len(message)
        if self._bytes > MAX_QUEUED_BYTES:
            log.warning(
                "%s: disconnected, %d MiB waiting unsent (it does not read)",
                self._name,
                self._bytes >> 20,
            )
            self.close()
            return
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        self._wake.set()

    async def _run(self) -> None:
        while not self.closed:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = list(self._queue)
            self._queue.clear()
            self._bytes = 0
            try:
                frames = list(self._coalesce(batch))
            except Exception:  # a frame we cannot parse: send the batch as it came
                log.exception("%s: could not coalesce %d messages", self._name, len(batch))
                frames = batch
            for frame in frames:
                if self.closed:
                    return
                self.frames += 1
                await self._send(frame)

    def close(self) -> None:
        self.closed = True
        self._queue.clear()
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
        with contextlib.suppress(Exception):
            self._wake.set()


class Sink(Protocol):
    """Where a receiver's messages go: an ``Outbox``, or the other replicas
    (``replicas.RoomLink``)."""

    def put(self, message: bytes) -> None: ...


class Receiver(Protocol):
    """A connection as the relay sees it (``channel.MarketChannel``), or the other
    replicas of the market (``replicas.RoomLink``)."""

    @property
    def outbox(self) -> Sink: ...


AWARENESS_INTERVAL = 0.05
"""Seconds between two awareness broadcasts of a busy room (a quiet room relays at once)."""


class AwarenessRelay:
    """Relays a room's awareness updates in batches: what arrives while a broadcast is
    due goes out as one merged message per receiver, at most every ``interval``.

    With N agents each renewing its state, relaying one by one costs N x N frames per
    heartbeat; batched, a receiver gets one frame per interval whatever N. A sender gets
    its own messages back too (its echo, a keep-alive), never its goodbye.
    """

    def __init__(
        self, receivers: Callable[[], Iterable[Receiver]], interval: float = AWARENESS_INTERVAL
    ) -> None:
        self._receivers = receivers
        self._interval = interval
        self._batch: list[tuple[Receiver, bytes, bool]] = []
        self._due: asyncio.TimerHandle | asyncio.Handle | None = None
        self._last = 0.0
        self.broadcasts = 0

    def add(self, sender: Receiver, message: bytes, leaving: bool) -> None:
        self._batch.append((sender, message, leaving))
        if self._due is None:
            loop = asyncio.get_running_loop()
            wait = self._last + self._interval - loop.time()
            self._due = (
                loop.call_later(wait, self.flush) if wait > 0 else loop.call_soon(self.flush)
            )

    def flush(self) -> None:
        if not self._batch:
            return
        if self._due is not None:
            self._due.cancel()  # when flushed early (a document update must follow)
        batch, self._batch, self._due = self._batch, [], None
        self._last = asyncio.get_running_loop().time()
        self.broadcasts += 1
        shared = _merge_awareness([m for _, m, _ in batch])
        # Only a sender saying goodbye gets a message of its own (without its goodbye).
        leavers = {id(s) for s, _, leaving in batch if leaving}
        for client in self._receivers():
            if id(client) in leavers:
                mine = [m for s, m, leaving in batch if not (s is client and leaving)]
                if mine:
                    client.outbox.put(_merge_awareness(mine))
            else:
                client.outbox.put(shared)

    def cancel(self) -> None:
        if self._due is not None:
            self._due.cancel()
            self._due = None
        self._batch.clear()
