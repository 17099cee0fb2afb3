"""Fuzzer of the market's update path: mutations of real Yjs updates and frames.

Each case mutates a seed (a real update as Igora's agents write them, or a y-websocket
frame: an update, a sync step 1, an awareness update) by bit flips, byte inserts and
deletes, varint rewrites (boundary values: 0, 2**31, 2**32 - 1, 2**32, 2**53, ...),
truncation and splicing, then runs it through what the market does with an incoming
frame: ``check_frame`` (which runs ``igora.updates.check_update``), and for what passes,
pycrdt's ``apply_update`` on a document already holding a room's state then
``get_update`` on it (what every joiner needs), ``get_update`` for a state vector, or
the awareness's ``apply_awareness_update``. A *crash* is an input that passes the checks
and makes pycrdt panic, leaves a document whose ``get_update`` fails, or makes the
awareness raise. With ``--raw`` the checks are skipped (updates only): that finds what
pycrdt panics on at all, i.e. what the checks must refuse.

Every crash ever found is kept in ``tests/fuzz_corpus/`` (hex, one input per file) and
replayed by ``tests/test_fuzz.py``. Run longer with::

    python -m tests.fuzz --cases 200000            # the market's path
    python -m tests.fuzz --cases 200000 --raw      # pycrdt alone
    python -m tests.fuzz --cases 200000 --save     # also write new crashes to the corpus

(pycrdt prints each panic on stderr; ``2>/dev/null`` hides them.)
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pycrdt import (
    Array,
    Awareness,
    Doc,
    Map,
    Text,
    YMessageType,
    create_awareness_message,
    create_sync_message,
    create_update_message,
    merge_updates,
    read_message,
)

from igora.lib0 import Lib0Error, Reader, uint_bytes
from igora.market.causal import CausalGate
from igora.market.frames import BadFrame, check_frame
from igora.updates import Parsed, UpdateError, check_update, is_panic

CORPUS = Path(__file__).resolve().parent / "fuzz_corpus"
BOUNDARIES = (
    0,
    1,
    2,
    0x7F,
    0x80,
    2**31,
    2**32 - 2,
    2**32 - 1,
    2**32,
    2**35,
    2**53 - 1,
    2**53,
    2**63 - 1,
)


def seeds() -> tuple[bytes, list[bytes]]:
    """A room's state (the base every mutant is applied to) and real updates on it."""
    room = Doc(client_id=11)
    todos, doing, done = (room.get(n, type=Map) for n in ("todos", "doing", "done"))
    streams = room.get("streams", type=Map)
    todos["t1"] = {
        "id": "t1",
        "prompt": "hello",
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0.7,
        "maxTokens": 64,
    }
    base = room.get_update()
    updates: list[bytes] = []

    def record(doc: Doc, change) -> None:  # type: ignore[no-untyped-def]
        before = doc.get_state()
        change()
        updates.append(doc.get_update(before))

    worker = Doc(client_id=22)
    worker.apply_update(base)
    w_todos, w_doing, w_done, w_streams = (
        worker.get(n, type=Map) for n in ("todos", "doing", "done", "streams")
    )

    def take() -> None:
        with worker.transaction():
            task = dict(w_todos["t1"])
            del w_todos["t1"]
            w_doing["t1"] = {**task, "worker": "w"}
            w_streams["t1#1"] = Text("")

    record(worker, take)
    for piece in ("Hel", "lo ", "wörld 🙂"):
        record(worker, lambda p=piece: w_streams["t1#1"].insert(len(w_streams["t1#1"]), p))

    def finish() -> None:
        with worker.transaction():
            del w_doing["t1"]
            w_done["t1"] = {"id": "t1", "state": "done", "response": "Hello wörld"}
            del w_streams["t1#1"]

    record(worker, finish)
    other = Doc(client_id=2**40 + 3)
    other.apply_update(worker.get_update())
    record(
        other,
        lambda: other.get("done", type=Map).__setitem__("list", Array([1, [2, {"a": None}], "x"])),
    )
    record(other, lambda: other.get("done", type=Map).pop("t1"))
    updates.append(worker.get_update())  # a whole state, as in a sync step 2
    updates.append(merge_updates(*updates[:4]))
    del todos, doing, done, streams
    return base, updates


def _varints(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of every position that reads as a varint."""
    out = []
    for i in range(len(data)):
        j = i
        while j < len(data) and data[j] & 0x80 and j - i < 9:
            j += 1
        if j < len(data):
            out.append((i, j + 1))
    return out


def mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        op = rng.randrange(7)
        if not b:
            b = bytearray(rng.choice(pool))
        if op == 0:  # bit flip
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1:  # insert bytes
            i = rng.randrange(len(b) + 1)
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.choice((1, 1, 2, 5))))
        elif op == 2:  # delete bytes
            i = rng.randrange(len(b))
            del b[i : i + rng.choice((1, 1, 2, 4))]
        elif op in (3, 4):  # rewrite a varint, often with a boundary value
            spans = _varints(bytes(b))
            if spans:
                i, j = rng.choice(spans)
                value = (
                    rng.choice(BOUNDARIES)
                    if rng.random() < 0.6
                    else max(0, int.from_bytes(b[i : i + 1], "little") + rng.randint(-3, 3))
                )
                b[i:j] = uint_bytes(value)
        elif op == 5:  # truncate
            del b[rng.randrange(len(b)) :]
        else:  # splice with another seed
            other = rng.choice(pool)
            i, j = rng.randrange(len(b) + 1), rng.randrange(len(other) + 1)
            b = b[:i] + other[j:] if rng.random() < 0.5 else bytearray(other[:j]) + b[i:]
    return bytes(b)


def carried(frame: bytes) -> bytes | None:
    """The update a sync frame carries (None for other frames)."""
    if len(frame) < 2 or frame[0] != 0 or frame[1] not in (1, 2):
        return None
    r = Reader(frame[2:])
    try:
        return r.chunk()
    except Lib0Error:
        return None


def room(base: bytes) -> Doc:
    doc = Doc()
    doc.apply_update(base)
    return doc


def _outcome(call: Callable[[], object]) -> bool | None:
    """None if ``call`` returned, True if it raised an ordinary error (a clean refusal),
    False if pycrdt panicked."""
    try:
        call()
    except Exception:
        return True
    except BaseException as exc:
        if is_panic(exc):
            return False
        raise
    return None


def _state_passes(doc: Doc) -> bool:
    """Whether the whole state of ``doc`` (what a newcomer receives) passes the checks
    agents make, without a panic."""
    try:
        check_update(doc.get_update())
    except UpdateError:
        return False
    except BaseException as exc:
        if is_panic(exc):
            return False
        raise
    return True


def survives(doc: Doc, update: bytes) -> bool:
    """Apply ``update`` on ``doc``; False if pycrdt panicked or left the document unable
    to give a state that passes the checks. Other errors are a clean refusal."""
    refused = _outcome(lambda: doc.apply_update(update))
    return _state_passes(doc) if refused is None else refused


def other_frames() -> list[bytes]:
    """Frames that carry no update: sync step 1 (a state vector), awareness updates."""
    base, updates = seeds()
    doc = Doc()
    doc.apply_update(base)
    out = [create_sync_message(Doc()), create_sync_message(doc)]
    for u in updates:
        doc.apply_update(u)
    out.append(create_sync_message(doc))
    awareness = Awareness(doc)
    awareness.set_local_state(
        {
            "id": "w1",
            "name": "worker",
            "type": "worker",
            "state": "ready",
            "date": 1_700_000_000_000,
            "slots": 2,
            "running": ["t1"],
            "models": [{"name": "echo", "contextLength": 4096}],
        }
    )
    out.append(create_awareness_message(awareness.encode_awareness_update([doc.client_id])))
    awareness.set_local_state(None)
    out.append(create_awareness_message(awareness.encode_awareness_update([doc.client_id])))
    return out


class Room:
    """A room's document behind the market's path: ``check_frame``, then the causal gate
    (``igora.market.causal``), then pycrdt, as ``MarketRoom.receive`` does."""

    def __init__(self, base: bytes) -> None:
        self.doc = room(base)
        self.gate: CausalGate[bytes] = CausalGate(self.doc.get_state())

    def take(self, frame: bytes) -> bool | None:
        """None if the checks refuse ``frame``, else whether what comes next handles it
        cleanly (pycrdt applies an update or answers a state vector without panicking,
        the room's awareness takes an awareness update)."""
        try:
            checked = check_frame(frame)
        except BadFrame:
            return None
        if frame[0] == YMessageType.AWARENESS:
            try:  # as MarketRoom.relay_awareness does: any error would be a traceback
                Awareness(Doc()).apply_awareness_update(read_message(frame[1:]), "remote")
            except Exception:
                return False
            return True
        if checked.update is None or checked.parsed is None:
            return frame[0] != YMessageType.SYNC or self._answer(read_message(frame[2:]))
        if not self.gate.ready(checked.parsed):
            return True if self.gate.wait(checked.parsed, checked.update, len(frame)) else None
        ok = self._apply(checked.update, checked.parsed)
        for parsed, update in self.gate.released():
            ok = self._apply(update, parsed) and ok
        return ok

    def _answer(self, state: bytes) -> bool:
        # an error is a clean refusal (MarketRoom._message_error), a panic is not
        return _outcome(lambda: self.doc.get_update(state)) is not False

    def _apply(self, update: bytes, parsed: Parsed) -> bool:
        if self.gate.splits_a_character(parsed):
            return True  # refused
        refused = _outcome(lambda: self.doc.apply_update(update))
        if refused is not None:
            return refused
        self.gate.applied(parsed)
        return _state_passes(self.doc)


def replay(base: bytes, frames: list[bytes], raw: bool) -> bool:
    """Whether a room holding ``base`` survives ``frames`` in order, through the market's
    path (or, ``raw``, straight to pycrdt)."""
    doc, market = room(base), Room(base)
    for frame in frames:
        update = carried(frame)
        if raw:
            if update is not None and not survives(doc, update):
                return False
        elif market.take(frame) is False:
            return False
    return True


def minimize(base: bytes, frames: list[bytes], raw: bool) -> list[bytes]:
    """A short subsequence of ``frames`` (ending with the same frame) that still crashes."""
    while True:
        for size in (len(frames) // 2, 64, 8, 1):
            if size < 1:
                continue
            i = 0
            shrunk = False
            while i < len(frames) - 1:
                shorter = frames[:i] + frames[i + size :]
                if shorter[-1:] == frames[-1:] and not replay(base, shorter, raw):
                    frames, shrunk = shorter, True
                else:
                    i += size
            if shrunk:
                break
        else:
            return frames


@dataclass
class Run:
    cases: int = 0
    refused: int = 0
    crashes: list[list[bytes]] = field(default_factory=list)  # frames replayed in order


def cases(seed: int) -> Iterator[tuple[bytes, bool]]:
    """Endless mutants: (input, is_frame)."""
    _, updates = seeds()
    frames = [create_update_message(u) for u in updates] + other_frames()
    pool = updates + frames
    rng = random.Random(seed)
    while True:
        frame = rng.random() < 0.3
        yield mutate(rng, rng.choice(frames if frame else updates), pool), frame


def fuzz(
    n: int, seed: int = 0, seconds: float = 1e9, raw: bool = False, chain: bool = False
) -> Run:
    """Run ``n`` cases (at most ``seconds``); return the crashes found.

    Each case goes to a fresh room holding the seeds' base state, or with ``chain`` to one
    room that keeps what it took, as a market's room does (a crash then depends on the
    history: it is kept as the shortest sequence of frames that still crashes)."""
    base, _ = seeds()
    run = Run()
    end = time.monotonic() + seconds
    doc, market = room(base), Room(base)
    history: list[bytes] = []
    for data, is_frame in cases(seed):
        if run.cases >= n or time.monotonic() > end:
            break
        run.cases += 1
        frame = data if is_frame else create_update_message(data)
        if not chain:
            doc, market = room(base), Room(base)
        if raw:
            update = carried(frame)
            ok = None if update is None else survives(doc, update)
        else:
            ok = market.take(frame)
        if ok is None:
            run.refused += 1
        elif ok:
            history.append(frame)
        else:
            crash = minimize(base, [*history, frame], raw) if chain else [frame]
            if crash not in run.crashes:
                run.crashes.append(crash)
            doc, market, history = room(base), Room(base), []
    return run


def corpus() -> list[tuple[str, list[bytes]]]:
    """Every crash found so far: (file name, the frames that crash a room, in order). A
    file holds one frame a line, in hex; ``#`` starts a comment."""
    out = []
    for path in sorted(CORPUS.glob("*.hex")):
        lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
        out.append((path.name, [bytes.fromhex(line) for line in lines if line]))
    return out


def corpus_entry(name: str) -> list[bytes]:
    return dict(corpus())[name]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seconds", type=float, default=1e9)
    ap.add_argument("--raw", action="store_true", help="skip the market's checks")
    ap.add_argument(
        "--chain",
        action="store_true",
        help="one room takes every case in turn (crashes that need a history)",
    )
    ap.add_argument("--save", action="store_true", help="write new crashes to the corpus")
    args = ap.parse_args(argv)
    started = time.monotonic()
    run = fuzz(args.cases, args.seed, args.seconds, args.raw, args.chain)
    took = time.monotonic() - started
    print(
        f"{run.cases} cases in {took:.1f} s, {run.refused} refused by the checks, "
        f"{len(run.crashes)} crash(es)",
        file=sys.stderr,
    )
    known = [frames for _, frames in corpus()]
    for frames in run.crashes:
        text = "".join(f.hex() + "\n" for f in frames)
        print(text)
        if args.save and frames not in known:
            kind = ("raw" if args.raw else "market") + ("-chain" if args.chain else "")
            name = f"{kind}-{hashlib.sha1(text.encode()).hexdigest()[:12]}.hex"
            (CORPUS / name).write_text(text)
    return 1 if run.crashes and not args.raw else 0


if __name__ == "__main__":
    sys.exit(main())
