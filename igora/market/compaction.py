"""Compaction of a room: drop what Yjs keeps of tasks that left the live document.

Why: a deleted entry of a top-level ``Y.Map`` stays in the document as a tombstone (its
id, parent, and key) so that concurrent writes to that key resolve the same way on every
peer. Every task leaves one per map it went through (about 145 bytes in all) and nothing
ever removes them: the update a newcomer downloads, and the market's memory, grow with
every task ever done.

What is safe to drop: the keys of a task (its entries in the four maps, its streams) once
every item of every one of them is deleted, i.e. the task has left the live document, and
was already so at the previous compaction (a grace period for late writes). A task still
live anywhere keeps the history of all its keys: a worker lost after minutes re-queues
its task into ``todos`` with the old ``todos`` item as left neighbour, which must still
exist. Collected items become GC structs, Yjs's own form for collected items: a clock
range, no content, no parent; consecutive ones merge. Children of a collected nested type
(the ``Y.Text`` of a finished stream) go with it. Everything else is kept byte for byte,
so peers that hold the full history and newcomers that get the compacted one keep
merging each other's updates. The one difference: a write whose left neighbour was
collected (an agent cut off for longer than the grace, writing to a task that has ended
and left) is collected too on arrival, as Yjs does for writes into deleted types; peers
with the full history still see it, as any late write of a cut-off agent.

The market compacts its rooms (``compactor.RoomCompactor``), and every agent its own document
(``Replica.compact``), both on the same schedule (``CompactionSchedule``); see docs/faults.md.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import ctypes
import ctypes.util
import os
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

from pycrdt import Doc

from ..lib0 import uint_bytes
from ..protocol import MapName, task_of
from ..updates import Struct, delete_set, parse

GC, SKIP = 0, 10
COMPACT_PAUSE = 2.0
"""Seconds without a task leaving after which a document (a room's, an agent's) is
compacted anyway (``CompactionSchedule``)."""
TASK_MAPS = frozenset(m.value for m in MapName)
"""Only these maps are compacted: their keys are task ids, never re-used once a task has
left. Anything else in a room (another application's maps) is kept as it is."""


class Compacted(NamedTuple):
    update: bytes  # the whole state, compacted
    dead: set[str]  # tasks with no live item now, not collected yet: next time if still dead
    collected: int  # structs turned into GC
    tasks: int  # tasks whose keys were collected


class _Index:
    """Structs of one client, found by clock."""

    def __init__(self) -> None:
        self.clocks: list[int] = []
        self.positions: list[int] = []

    def find(self, clock: int) -> int | None:
        i = bisect.bisect_right(self.clocks, clock) - 1
        return self.positions[i] if i >= 0 else None


def _deleted_checker(raw: bytes) -> Callable[[Struct], bool]:
    ranges = {c: sorted(rs) for c, rs in delete_set(raw).items()}
    starts = {c: [s for s, _ in rs] for c, rs in ranges.items()}

    def deleted(s: Struct) -> bool:
        rs = ranges.get(s.client)
        if not rs:
            return False
        i = bisect.bisect_right(starts[s.client], s.clock) - 1
        return i >= 0 and s.clock + s.length <= rs[i][0] + rs[i][1]

    return deleted


def compact(state: bytes, spared: set[str] | None = None) -> Compacted:
    """Compact a room's state (a v1 update from an empty state vector).

    ``spared`` is the previous call's ``dead``: only tasks in it are collected. ``None``
    collects every dead task at once.
    """
    parsed = parse(state)
    structs = parsed.structs
    deleted = _deleted_checker(parsed.delete_set)
    index: dict[int, _Index] = {}
    for i, s in enumerate(structs):
        ix = index.setdefault(s.client, _Index())
        ix.clocks.append(s.clock)
        ix.positions.append(i)

    def at(id_: tuple[int, int]) -> int | None:
        ix = index.get(id_[0])
        if ix is None:
            return None
        i = ix.find(id_[1])
        if i is None:
            return None
        s = structs[i]
        return i if s.clock <= id_[1] < s.clock + s.length else None

    # Parent and key of every item: explicit, or those of its origin (right origin).
    parent: list[str | tuple[int, int] | None] = [None] * len(structs)
    key: list[str | None] = [None] * len(structs)
    resolved = [False] * len(structs)
    for i in range(len(structs)):
        path = []
        j: int | None = i
        while j is not None and not resolved[j]:
            t = structs[j]
            resolved[j] = True  # also guards against a cycle of origins
            if t.ref in (GC, SKIP):
                j = None
                break
            path.append(j)
            neighbour = t.origin if t.origin is not None else t.right_origin
            if neighbour is None:
                parent[j], key[j] = t.parent, t.key
                j = None
                break
            j = at(neighbour)
        p, k = (parent[j], key[j]) if j is not None else (None, None)
        for m in reversed(path):
            if parent[m] is None:
                parent[m] = p
                if key[m] is None and structs[m].origin is not None:
                    key[m] = k
            p, k = parent[m], key[m]

    alive: dict[str, bool] = {}  # task id -> has a live item in some map
    for i, s in enumerate(structs):
        p, k = parent[i], key[i]
        if p in TASK_MAPS and k is not None:
            task = task_of(p, k)
            alive[task] = alive.get(task, False) or not deleted(s)
    dead = {task for task, live in alive.items() if not live}
    chosen = dead if spared is None else dead & spared

    collect: list[bool | None] = [None] * len(structs)
    for i in range(len(structs)):
        chain = []
        j = i
        verdict = False
        while j is not None and collect[j] is None:
            chain.append(j)
            s, p = structs[j], parent[j]
            if s.ref in (GC, SKIP) or p is None:
                break
            if isinstance(p, str):
                k = key[j]
                verdict = p in TASK_MAPS and k is not None and task_of(p, k) in chosen
                break
            j = at(p)  # the nested type holding this item
            if j is None:
                break
        else:
            if j is not None:
                verdict = bool(collect[j])
        for m in chain:
            collect[m] = verdict

    out = bytearray()
    clients: list[bytes] = []
    collected = 0
    n = len(structs)
    i = 0
    while i < n:
        client, first = structs[i].client, structs[i].clock
        body = bytearray()
        count = 0
        gc_run = 0
        while i < n and structs[i].client == client:
            s = structs[i]
            if s.ref == GC or collect[i]:
                collected += s.ref != GC
                gc_run += s.length
            else:
                if gc_run:
                    body += b"\x00" + uint_bytes(gc_run)
                    count += 1
                    gc_run = 0
                body += state[s.start : s.end]
                count += 1
            i += 1
        if gc_run:
            body += b"\x00" + uint_bytes(gc_run)
            count += 1
        clients.append(uint_bytes(count) + uint_bytes(client) + uint_bytes(first) + bytes(body))
    out += uint_bytes(len(clients))
    for c in clients:
        out += c
    out += parsed.delete_set
    return Compacted(bytes(out), dead - chosen, collected, len(chosen))


class CompactionSchedule:
    """When a document is compacted: at once when ``every`` tasks have left it since the
    last pass, and when no task has left for ``quiet`` s while some left since the last
    pass or were marked by it (two quiet passes leave no tombstone: the first marks the
    tasks gone, the second collects them). One pass at a time.

    Why at a count and not on a clock: a pass holds the whole state of the document, so
    its memory peak follows the tasks it covers, and the process keeps the high-water
    mark of its biggest pass (glibc's heap, pymalloc's arenas). Compacting every ``every``
    tasks keeps the passes the same size whatever the rate (docs/faults.md).

    ``compact`` runs one pass and returns whether it marked tasks for the next one; it
    stops the schedule (``stop``) if it cannot go on. ``every`` = 0: never."""

    def __init__(
        self, every: int, compact: Callable[[], Awaitable[bool]], quiet: float = COMPACT_PAUSE
    ) -> None:
        self.every = every
        self.quiet = quiet
        self.left = 0  # tasks gone from the document since the last pass began
        self._compact = compact
        self._marked = False  # the last pass marked tasks that the next one collects
        self._due = asyncio.Event()  # set when ``every`` tasks have left
        self._task: asyncio.Task[None] | None = None

    def task_left(self, count: int = 1) -> None:
        """``count`` tasks left the document: start the schedule, or wake it at once if
        a pass is due. Needs a running event loop, except with nothing to schedule."""
        self.left += count
        if not self.every or not self.left:
            return
        if self.left >= self.every:
            self._due.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        """Never compact again (the pass under way, if any, ends normally)."""
        self.every = 0
        self._due.set()

    def cancel(self) -> None:
        """End the schedule now, a pass under way included."""
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        while self.every and (self.left or self._marked):
            if self.left < self.every:
                seen = self.left
                self._due.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.quiet):
                        await self._due.wait()
                if not self.every or (self.left < self.every and self.left != seen):
                    continue  # stopped, or tasks still leaving but fewer than ``every``
            self.left = 0
            self._due.clear()
            self._marked = await self._compact()


# One thread for every rewrite of the process: each thread that allocates gets its own
# glibc heap (arena), which keeps its high-water mark; rewrites spread over the default
# executor's threads made several, and the memory of a process crept up with them.
_REWRITER = ThreadPoolExecutor(1, thread_name_prefix="igora-compaction")


M_MMAP_THRESHOLD = -3  # mallopt's parameter number (glibc malloc.h)
MMAP_THRESHOLD = 128 * 1024  # glibc's default, fixed


def _glibc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and libc.malloc_trim and libc.mallopt else None
    except (OSError, AttributeError):  # not glibc: nothing to tune or trim
        return None


_libc = _glibc()
_tuned = False


def tune_allocator() -> None:
    """Keep every block of 128 KiB or more out of glibc's heap, in a mapping of its own
    that goes back to the system when freed. glibc raises that threshold to the size of
    the largest such block freed (up to 32 MiB): after the first compaction, the state
    and the rewrite's buffers (hundreds of kB, one set per compaction) went into the heap
    between the document's small blocks, and the heap of every agent grew with the
    largest compaction seen (docs/faults.md). Once per process, before its first
    compaction (or a v3 room's first replace, ``igora.v3.epochs``); not if the user set
    the threshold (``MALLOC_MMAP_THRESHOLD_``,
    ``GLIBC_TUNABLES``)."""
    global _tuned
    if _tuned:
        return
    _tuned = True
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if _libc is None or "MALLOC_MMAP_THRESHOLD_" in os.environ or "mmap_threshold" in tunables:
        return
    _libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def release_memory() -> None:
    """Give the pages freed by a compaction (the old document, the rewrite's buffers) back
    to the system now (glibc keeps freed heap pages otherwise; no-op elsewhere)."""
    if _libc is not None:
        _libc.malloc_trim(0)


async def compact_doc(doc: Doc[Any], spared: set[str] | None) -> tuple[Doc[Any], Compacted, int]:
    """A new document (same client id) holding ``doc``'s state compacted, then whatever
    ``doc`` received while the rewrite ran in a thread; and the size of the state before.
    ``doc`` itself is not changed: the caller swaps the new one in with no await between,
    then calls ``release_memory``."""
    tune_allocator()
    vector, state = doc.get_state(), doc.get_update()
    loop = asyncio.get_running_loop()
    result = await loop.run_in_executor(_REWRITER, compact, state, spared)
    fresh: Doc[Any] = Doc(client_id=doc.client_id)
    fresh.apply_update(result.update)
    fresh.apply_update(doc.get_update(vector))
    return fresh, result, len(state)
