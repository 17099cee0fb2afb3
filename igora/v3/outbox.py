"""What a v3 connection writes when frames piled up while it was writing (protocol-v3.md §3).

The queue and its writer task are the market's ``fanout.Outbox``; this module is how a v3
connection packs a backlog: consecutive updates of one document merged into one update
(``pycrdt.merge_updates``, as y-websocket connections do in ``fanout.coalesce``), and the
frames sent as one ``BATCH``. A quiet connection sends each frame as it is.
"""

from __future__ import annotations

from collections.abc import Iterator

from pycrdt import merge_updates

from .wire import MAX_BATCH, Batch, Doc, Kind, Sync, batch, decode, encode

MAX_BATCH_BYTES = 1 << 20
"""A ``BATCH`` holds frames up to this many bytes (a larger frame goes alone): far below
the market's ``--max-message`` (16 MiB by default), and a reader is not held up by one
huge message."""


def _update(frame: bytes) -> Doc | None:
    """The frame as a ``Doc`` if it is a document update."""
    if not frame or frame[0] != Kind.DOC:
        return None
    doc = decode(frame)
    return doc if isinstance(doc, Doc) and doc.sync is Sync.UPDATE else None


def merge_runs(frames: list[bytes]) -> list[bytes]:
    """``frames`` in order, each run of consecutive updates of one document merged (a
    frame not merged is kept as it came, not encoded again)."""
    out: list[bytes] = []
    run: list[tuple[bytes, Doc]] = []

    def close_run() -> None:
        if len(run) > 1:
            merged = merge_updates(*(d.payload for _, d in run))
            out.append(encode(Doc(run[0][1].name, Sync.UPDATE, merged)))
        elif run:
            out.append(run[0][0])
        run.clear()

    for frame in frames:
        doc = _update(frame)
        if doc is not None and run and doc.name == run[0][1].name:
            run.append((frame, doc))
            continue
        close_run()
        if doc is not None:
            run.append((frame, doc))
        else:
            out.append(frame)
    close_run()
    return out


def coalesce(backlog: list[bytes]) -> Iterator[bytes]:
    """The messages to write for ``backlog``: its frames with runs of updates merged,
    packed into as few ``BATCH`` frames as the limits allow (``MAX_BATCH`` frames,
    ``MAX_BATCH_BYTES``). A ``BATCH`` in the backlog is unpacked first: batches do not
    nest."""
    flat: list[bytes] = []
    for frame in backlog:
        if frame and frame[0] == Kind.BATCH:
            outer = decode(frame)
            assert isinstance(outer, Batch)
            flat.extend(outer.frames)
        else:
            flat.append(frame)
    pending: list[bytes] = []
    size = 0
    for frame in merge_runs(flat) if len(flat) > 1 else flat:
        if pending and (len(pending) == MAX_BATCH or size + len(frame) > MAX_BATCH_BYTES):
            yield batch(pending)
            pending, size = [], 0
        pending.append(frame)
        size += len(frame)
    if pending:
        yield batch(pending)
