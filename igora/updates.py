"""Inspect a Yjs update (v1 encoding) before anyone applies it.

Why: the Yjs decoder in pycrdt (yrs) and pycrdt's event processing are recursive. A value
nested some thousands of levels deep (``[[[[...]]]]``, 2 bytes per level) makes every
observer raise ``RecursionError`` and each reconnect fail again; some tens of thousands of
levels overflow the native stack and kill the process (the market first). Honest tasks
nest 3 or 4 levels. The market measures the nesting of every incoming update with this
iterative reader (no recursion of its own) and refuses the frame when it is too deep.

The reader follows the v1 update layout of Yjs/yrs: per client a run of structs (GC, Skip
or Item with origins, parent and content), then the delete set; anything it cannot decode
raises ``UpdateError``. The market's compaction (``igora.market.compaction``) reads a
room's whole state with the same reader.
"""

from __future__ import annotations

from typing import NamedTuple

from .lib0 import Reader

MAX_DEPTH = 64
"""Deepest nesting of arrays/objects accepted in a value of the shared document."""

# lib0 ``writeAny`` tags
_UNDEFINED, _NULL, _INT, _F32 = 127, 126, 125, 124
_F64, _BIGINT, _FALSE, _TRUE = 123, 122, 121, 120
_STRING, _OBJECT, _ARRAY, _BYTES = 119, 118, 117, 116


class UpdateError(ValueError):
    """The update is malformed, or nests values deeper than allowed."""


def _any_depth(r: Reader, limit: int) -> int:
    """Read one lib0 Any value; return its nesting depth (a scalar is 0)."""
    # Stack of containers still to read: [items left, is_object]
    stack: list[list[int]] = []
    deepest = 0
    while True:
        tag = r.byte()
        if tag in (_OBJECT, _ARRAY):
            n = r.uint()
            if n:
                stack.append([n, tag == _OBJECT])
                deepest = max(deepest, len(stack))
                if deepest > limit:
                    raise UpdateError(f"a value nests deeper than {limit} levels")
                if tag == _OBJECT:
                    r.chunk()  # first key
                continue
            deepest = max(deepest, len(stack) + 1)
        elif tag == _STRING or tag == _BYTES:
            r.chunk()
        elif tag == _INT:
            r.uint()  # signed varint: same byte layout
        elif tag == _F32:
            r.skip(4)
        elif tag in (_F64, _BIGINT):
            r.skip(8)
        elif tag not in (_UNDEFINED, _NULL, _FALSE, _TRUE):
            raise UpdateError(f"unknown value tag {tag}")
        # One value done: close the containers it completed.
        while stack:
            stack[-1][0] -= 1
            if stack[-1][0] > 0:
                if stack[-1][1]:
                    r.chunk()  # next key
                break
            stack.pop()
        if not stack:
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


def _utf16_length(raw: bytes) -> int:
    """Length of a UTF-8 string in UTF-16 code units, as Yjs counts string content."""
    try:
        text = raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        raise UpdateError("string content is not UTF-8") from None
    return len(text) + sum(1 for c in text if ord(c) > 0xFFFF)


def parse(update: bytes, limit: int = MAX_DEPTH, keep: bool = True) -> Parsed:
    """Read a v1 update: its structs (if ``keep``), delete set and deepest value nesting.

    Raise UpdateError if it is malformed or nests values deeper than ``limit``."""
    r = Reader(update, UpdateError)
    deepest = 0
    structs: list[Struct] = []

    def seen(d: int) -> None:
        nonlocal deepest
        if d > limit:
            raise UpdateError(f"a value nests deeper than {limit} levels")
        deepest = max(deepest, d)

    for _ in range(r.uint()):  # clients
        n_structs = r.uint()
        client = r.uint()
        clock = r.uint()
        for _ in range(n_structs):
            start = r.pos
            info = r.byte()
            ref = info & 0x1F
            origin = right = parent = key = None
            if ref in (0, 10):  # GC, Skip
                length = r.uint()
            else:
                if info & 0x80:
                    origin = (r.uint(), r.uint())
                if info & 0x40:
                    right = (r.uint(), r.uint())
                if info & 0xC0 == 0:
                    if r.uint() == 1:
                        parent = r.text("root type name")
                    else:
                        parent = (r.uint(), r.uint())
                    if info & 0x20:
                        key = r.text("map key")
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
                    length = len(raw) if raw.isascii() else _utf16_length(raw)
                elif ref == 5:  # embed (JSON)
                    seen(_json_depth(r.chunk()))
                elif ref == 6:  # format: key, JSON value
                    r.chunk()
                    seen(_json_depth(r.chunk()))
                elif ref == 7:  # nested shared type
                    if r.uint() in (3, 5):  # XmlElement, XmlHook carry a name
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
            if keep:
                structs.append(Struct(client, clock, length, ref, origin, right, parent, key,
                                      start, r.pos))
            clock += length
    return Parsed(structs, update[r.pos:], deepest)


def update_depth(update: bytes, limit: int = MAX_DEPTH) -> int:
    """Deepest value nesting in a v1 update; raise UpdateError if malformed or > limit."""
    return parse(update, limit, keep=False).depth


_OPENERS = (bytes([_ARRAY]), bytes([_OBJECT]), b"[", b"{")


def check_depth(update: bytes, limit: int = MAX_DEPTH) -> None:
    """Raise UpdateError if a value of the update nests deeper than ``limit``.

    Each level of nesting takes one byte that opens an array or an object (a lib0 tag
    or a JSON bracket): an update with at most ``limit`` of those bytes, i.e. nearly
    every one, needs no parsing (the market checks every incoming update)."""
    if sum(update.count(c) for c in _OPENERS) > limit:
        update_depth(update, limit)


def delete_set(raw: bytes) -> dict[int, list[tuple[int, int]]]:
    """Decode a delete set: per client, its deleted ranges as (clock, length)."""
    r = Reader(raw, UpdateError)
    out: dict[int, list[tuple[int, int]]] = {}
    for _ in range(r.uint()):
        client = r.uint()
        out[client] = [(r.uint(), r.uint()) for _ in range(r.uint())]
    return out
