"""Inspect a Yjs update (v1 encoding) before anyone applies it.

Why: the Yjs decoder in pycrdt (yrs) and pycrdt's event processing are recursive. A value
nested some thousands of levels deep (``[[[[...]]]]``, 2 bytes per level) makes every
observer raise ``RecursionError`` and each reconnect fail again; some tens of thousands of
levels overflow the native stack and kill the process (the market first). Honest tasks
nest 3 or 4 levels. The market measures the nesting of every incoming update with this
iterative reader (no recursion of its own) and refuses the frame when it is too deep.

The same reader is strict about what Yjs cannot represent, because yrs trusts the numbers
it decodes and *panics* on some of them (pycrdt raises ``PanicException``, a
``BaseException``, and the document is left broken: every later ``get_update`` panics
too). One 80-byte frame with clocks past 2**32 locked a room until the market restarted
(issue 20). So an update is refused when

- a clock, a length, or a clock plus its length is past 2**31 - 1 (``MAX_CLOCK``), or a
  client id is past JavaScript's exact integers (``MAX_CLIENT``);
- a struct (GC, Skip, deleted run, string, JSON or Any content) is empty, or a GC/Skip
  info byte carries item flags (Yjs reads the low 5 bits, yrs the whole byte);
- a client appears twice in the struct section or the delete set, or with no struct, or a
  struct refers to an item of its own client that is not older than itself;
- a delete-set range is empty, out of order or overlaps the previous one;
- a nested type is of an unknown kind, or bytes follow the delete set.

Honest peers (Yjs, yrs/pycrdt) write none of these. The reader follows the v1 layout of
Yjs/yrs: per client a run of structs (GC, Skip or Item with origins, parent and
content), then the delete set; anything it cannot decode raises ``UpdateError``. The
market checks every incoming update with it (``check_update``: ~80 ms per MB, about four
times what pycrdt takes to apply it), and its
compaction (``igora.market.compaction``) reads a room's whole state with it.
"""

from __future__ import annotations

from typing import NamedTuple

from .lib0 import Reader, chunk_end, uint_at

MAX_DEPTH = 64
"""Deepest nesting of arrays/objects accepted in a value of the shared document."""

MAX_CLOCK = 2**31 - 1
"""The end of every struct and delete-set range must stay within. yrs keeps clocks in 32
bits and wraps past them; from 2**31 on, some of its arithmetic overflows too (panics
found by ``tests/fuzz.py``). A client would need two billion insertions to get there."""

MAX_CLIENT = 2**53 - 1
"""Largest client id a JavaScript peer reads exactly (Yjs picks 32-bit ids, yrs 53-bit)."""

_TYPE_REFS = 7  # Array, Map, Text, XmlElement, XmlFragment, XmlHook, XmlText

# lib0 ``writeAny`` tags
_UNDEFINED, _NULL, _INT, _F32 = 127, 126, 125, 124
_F64, _BIGINT, _FALSE, _TRUE = 123, 122, 121, 120
_STRING, _OBJECT, _ARRAY, _BYTES = 119, 118, 117, 116


class UpdateError(ValueError):
    """The update is malformed, or nests values deeper than allowed."""


def is_panic(exc: BaseException) -> bool:
    """Whether ``exc`` is a panic of pycrdt's native library (pyo3's ``PanicException``,
    which derives from ``BaseException``: ``except Exception`` lets it through). The
    document it happened in may be broken for good: its holder must rebuild it."""
    return type(exc).__name__ == "PanicException"


def _any_depth(r: Reader, limit: int) -> int:
    """Read one lib0 Any value; return its nesting depth (a scalar is 0).

    On the hot path (every task a peer writes is one): it walks the bytes with a local
    position, skipping strings and keys without copying them."""
    buf, pos, end = r.buf, r.pos, len(r.buf)
    # Stack of containers still to read: [items left, is_object]
    stack: list[list[int]] = []
    deepest = 0
    while True:
        if pos >= end:
            raise UpdateError("truncated message")
        tag = buf[pos]
        pos += 1
        if tag in (_STRING, _BYTES):
            pos = chunk_end(buf, pos, UpdateError)
        elif tag in (_OBJECT, _ARRAY):
            n, pos = uint_at(buf, pos, UpdateError)
            if n:
                stack.append([n, tag == _OBJECT])
                if len(stack) > deepest:
                    deepest = len(stack)
                    if deepest > limit:
                        raise UpdateError(f"a value nests deeper than {limit} levels")
                if tag == _OBJECT:
                    pos = chunk_end(buf, pos, UpdateError)  # first key
                continue
            deepest = max(deepest, len(stack) + 1)
        elif tag == _INT:
            _, pos = uint_at(buf, pos, UpdateError)  # signed varint: same byte layout
        elif tag in (_F32, _F64, _BIGINT):
            pos += 4 if tag == _F32 else 8
            if pos > end:
                raise UpdateError("truncated message")
        elif tag not in (_UNDEFINED, _NULL, _FALSE, _TRUE):
            raise UpdateError(f"unknown value tag {tag}")
        # One value done: close the containers it completed.
        while stack:
            top = stack[-1]
            top[0] -= 1
            if top[0] > 0:
                if top[1]:
                    pos = chunk_end(buf, pos, UpdateError)  # next key
                break
            stack.pop()
        if not stack:
            r.pos = pos
            return deepest


def _json_depth(text: bytes) -> int:
    depth = deepest = 0
    in_string = escaped = False
    for c in text:
        if in_string:
            if escaped:
                escaped = False
            elif c == 0x5C:
                escaped = True
            elif c == 0x22:
                in_string = False
        elif c == 0x22:
            in_string = True
        elif c in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif c in (0x5D, 0x7D):
            depth -= 1
    return deepest


class Struct(NamedTuple):
    """One struct of a v1 update, as far as compaction needs it."""

    client: int
    clock: int
    length: int
    ref: int  # content kind: 0 GC, 10 Skip, else an Item's content type
    origin: tuple[int, int] | None
    right_origin: tuple[int, int] | None
    parent: str | tuple[int, int] | None  # root type name, or the id of a nested type's item
    key: str | None  # the key in a parent map
    start: int  # byte span of the struct in the update
    end: int


class Parsed(NamedTuple):
    structs: list[Struct]
    delete_set: bytes  # the update's trailing delete set, verbatim
    depth: int
    clocks: dict[int, tuple[int, int]]  # per client: its structs' first clock and end
    needs: dict[int, int]  # per client: the clock its items refer to or delete up to
    skips: bool  # whether it has Skip structs (gaps in a client's clocks)
    halves: dict[int, set[int]]  # per client: clocks of the second halves of surrogate pairs


def _utf16_length(raw: bytes, clock: int = 0, halves: set[int] | None = None) -> int:
    """Length of a UTF-8 string in UTF-16 code units, as Yjs counts string content; adds
    to ``halves`` the clocks of the second units of its surrogate pairs (if it starts at
    ``clock``)."""
    try:
        text = raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        raise UpdateError("string content is not UTF-8") from None
    n = 0
    for c in text:
        n += 1
        if ord(c) > 0xFFFF:
            if halves is not None:
                halves.add(clock + n)
            n += 1
    return n


def _id(
    r: Reader, client: int, clock: int, needs: dict[int, int], ints: dict[int, int]
) -> tuple[int, int]:
    """An item id an item refers to; of its own client, it must be an older item. Its
    client is the one int object of ``ints`` for that client (not one per id)."""
    other, at = r.uint(), r.uint()
    if other > MAX_CLIENT or at > MAX_CLOCK:
        raise UpdateError("an item refers to an id Yjs cannot represent")
    if other == client and at >= clock:
        raise UpdateError("an item refers to a later item of its own client")
    if at >= needs.get(other, 0):
        needs[other] = at + 1
    return ints.setdefault(other, other), at


def parse(update: bytes, limit: int = MAX_DEPTH, keep: bool = True) -> Parsed:
    """Read a v1 update: its structs (if ``keep``), delete set and deepest value nesting.

    Raise UpdateError if it is malformed, breaks a rule of the module docstring, or
    nests values deeper than ``limit``."""
    r = Reader(update, UpdateError)
    deepest = 0
    structs: list[Struct] = []

    def seen(d: int) -> None:
        nonlocal deepest
        if d > limit:
            raise UpdateError(f"a value nests deeper than {limit} levels")
        deepest = max(deepest, d)

    clients: dict[int, tuple[int, int]] = {}
    needs: dict[int, int] = {}
    halves: dict[int, set[int]] = {}
    names: dict[str, str] = {}  # one object per distinct root name or key, not per item
    ints: dict[int, int] = {}  # the same for client ids (ints over 256 are objects)
    skips = False
    for _ in range(r.uint()):
        n_structs = r.uint()
        client = r.uint()
        clock = r.uint()
        if client > MAX_CLIENT or client in clients:
            raise UpdateError(f"bad or repeated client id {client}")
        if n_structs == 0:  # yrs panics on it when the document knows that client
            raise UpdateError(f"client {client} with no struct")
        first = clock
        for _ in range(n_structs):
            start = r.pos
            info = r.byte()
            ref = info & 0x1F
            origin: tuple[int, int] | None = None
            right: tuple[int, int] | None = None
            parent: str | tuple[int, int] | None = None
            key: str | None = None
            if ref in (0, 10):  # GC, Skip
                if info != ref:
                    raise UpdateError("a GC or Skip struct with item flags")
                length = r.uint()
                skips = skips or ref == 10
            else:
                if info & 0x80:
                    origin = _id(r, client, clock, needs, ints)
                if info & 0x40:
                    right = _id(r, client, clock, needs, ints)
                if info & 0xC0 == 0:
                    if r.uint() == 1:
                        parent = r.text("root type name")
                        parent = names.setdefault(parent, parent)
                    else:
                        parent = _id(r, client, clock, needs, ints)
                    if info & 0x20:
                        key = r.text("map key")
                        key = names.setdefault(key, key)
                length = 1
                if ref == 1:  # deleted
                    length = r.uint()
                elif ref == 2:  # JSON strings
                    length = r.uint()
                    for _ in range(length):
                        seen(_json_depth(r.chunk()))
                elif ref == 3:  # binary
                    r.chunk()
                elif ref == 4:  # string: its length counts UTF-16 code units
                    raw = r.chunk()
                    length = (
                        len(raw)
                        if raw.isascii()
                        else _utf16_length(raw, clock, halves.setdefault(client, set()))
                    )
                elif ref == 5:  # embed (JSON)
                    seen(_json_depth(r.chunk()))
                elif ref == 6:  # format: key, JSON value
                    r.chunk()
                    seen(_json_depth(r.chunk()))
                elif ref == 7:  # nested shared type
                    kind = r.uint()
                    if kind >= _TYPE_REFS:
                        raise UpdateError(f"unknown shared type {kind}")
                    if kind in (3, 5):  # XmlElement, XmlHook carry a name
                        r.chunk()
                elif ref == 8:  # any values
                    length = r.uint()
                    for _ in range(length):
                        seen(_any_depth(r, limit))
                elif ref == 9:  # subdocument
                    r.chunk()
                    seen(_any_depth(r, limit))
                else:
                    raise UpdateError(f"unknown content type {ref}")
            if length == 0:
                raise UpdateError("an empty struct")
            if clock + length > MAX_CLOCK:
                raise UpdateError("a clock past what Yjs can represent")
            if keep:
                structs.append(
                    Struct(client, clock, length, ref, origin, right, parent, key, start, r.pos)
                )
            clock += length
        clients[client] = (first, clock)
    ds_start = r.pos
    for c, ranges in _read_delete_set(r).items():
        if ranges and ranges[-1][0] + ranges[-1][1] > needs.get(c, 0):
            needs[c] = ranges[-1][0] + ranges[-1][1]
    if r.pos != len(update):
        raise UpdateError("trailing bytes after the delete set")
    return Parsed(structs, update[ds_start:], deepest, clients, needs, skips, halves)


def update_depth(update: bytes, limit: int = MAX_DEPTH) -> int:
    """Deepest value nesting in a v1 update; raise UpdateError if malformed or > limit."""
    return parse(update, limit, keep=False).depth


def check_update(update: bytes, limit: int = MAX_DEPTH) -> Parsed:
    """Raise UpdateError unless ``update`` is a well-formed v1 update that Yjs can
    represent, nesting no value deeper than ``limit``; return what ``parse`` read (its
    structs left out)."""
    return parse(update, limit, keep=False)


def state_vector(raw: bytes) -> dict[int, int]:
    """Decode a state vector: per client, the clock its next struct will have."""
    r = Reader(raw, UpdateError)
    return {r.uint(): r.uint() for _ in range(r.uint())}


def _read_delete_set(r: Reader) -> dict[int, list[tuple[int, int]]]:
    out: dict[int, list[tuple[int, int]]] = {}
    for _ in range(r.uint()):
        client = r.uint()
        if client > MAX_CLIENT or client in out:
            raise UpdateError(f"bad or repeated client id {client} in the delete set")
        ranges = out[client] = []
        end = 0
        for _ in range(r.uint()):
            clock, length = r.uint(), r.uint()
            if length == 0 or clock < end or clock + length > MAX_CLOCK:
                raise UpdateError("an empty, unordered or unrepresentable deleted range")
            end = clock + length
            ranges.append((clock, length))
    return out


def delete_set(raw: bytes) -> dict[int, list[tuple[int, int]]]:
    """Decode a delete set: per client, its deleted ranges as (clock, length)."""
    return _read_delete_set(Reader(raw, UpdateError))
