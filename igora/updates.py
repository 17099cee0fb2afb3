"""Inspect a Yjs update (v1 encoding) before anyone applies it.

Why: the Yjs decoder in pycrdt (yrs) and pycrdt's event processing are recursive. A value
nested some thousands of levels deep (``[[[[...]]]]``, 2 bytes per level) makes every
observer raise ``RecursionError`` and each reconnect fail again; some tens of thousands of
levels overflow the native stack and kill the process (the market first). Honest tasks
nest 3 or 4 levels. The market measures the nesting of every incoming update with this
iterative reader (no recursion of its own) and refuses the frame when it is too deep.

The reader follows the v1 update layout of Yjs/yrs: per client a run of structs (GC, Skip
or Item with origins, parent and content), then the delete set. It only reads what it
needs to find the depth; anything it cannot decode raises ``UpdateError``.
"""

from __future__ import annotations

MAX_DEPTH = 64
"""Deepest nesting of arrays/objects accepted in a value of the shared document."""

# lib0 ``writeAny`` tags
_UNDEFINED, _NULL, _INT, _F32 = 127, 126, 125, 124
_F64, _BIGINT, _FALSE, _TRUE = 123, 122, 121, 120
_STRING, _OBJECT, _ARRAY, _BYTES = 119, 118, 117, 116


class UpdateError(ValueError):
    """The update is malformed, or nests values deeper than allowed."""


class _Reader:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.buf):
            raise UpdateError("truncated update")
        b = self.buf[self.pos]
        self.pos += 1
        return b

    def uint(self) -> int:
        n, shift = 0, 0
        while True:
            b = self.byte()
            n |= (b & 0x7F) << shift
            if b < 0x80:
                return n
            shift += 7
            if shift > 70:
                raise UpdateError("varint too long")

    def skip(self, n: int) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise UpdateError("truncated update")
        self.pos += n

    def string(self) -> bytes:
        n = self.uint()
        start = self.pos
        self.skip(n)
        return self.buf[start:self.pos]

    def int_(self) -> None:  # signed varint: same byte layout as a varuint
        self.uint()


def _any_depth(r: _Reader, limit: int) -> int:
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
                    r.string()  # first key
                continue
            deepest = max(deepest, len(stack) + 1)
        elif tag == _STRING or tag == _BYTES:
            r.string()
        elif tag == _INT:
            r.int_()
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
                    r.string()  # next key
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


def update_depth(update: bytes, limit: int = MAX_DEPTH) -> int:
    """Deepest value nesting in a v1 update; raise UpdateError if malformed or > limit."""
    r = _Reader(update)
    deepest = 0

    def seen(d: int) -> None:
        nonlocal deepest
        if d > limit:
            raise UpdateError(f"a value nests deeper than {limit} levels")
        deepest = max(deepest, d)

    for _ in range(r.uint()):  # clients
        n_structs = r.uint()
        r.uint()  # client id
        r.uint()  # first clock
        for _ in range(n_structs):
            info = r.byte()
            ref = info & 0x1F
            if ref in (0, 10):  # GC, Skip
                r.uint()
                continue
            if info & 0x80:
                r.uint(), r.uint()  # origin
            if info & 0x40:
                r.uint(), r.uint()  # right origin
            if info & 0xC0 == 0:
                if r.uint() == 1:
                    r.string()  # root type name
                else:
                    r.uint(), r.uint()  # parent id
                if info & 0x20:
                    r.string()  # key in the parent map
            if ref == 1:  # deleted
                r.uint()
            elif ref == 2:  # JSON strings
                for _ in range(r.uint()):
                    seen(_json_depth(r.string()))
            elif ref in (3, 4):  # binary, string
                r.string()
            elif ref == 5:  # embed (JSON)
                seen(_json_depth(r.string()))
            elif ref == 6:  # format: key, JSON value
                r.string()
                seen(_json_depth(r.string()))
            elif ref == 7:  # nested shared type
                if r.uint() in (3, 5):  # XmlElement, XmlHook carry a name
                    r.string()
            elif ref == 8:  # any values
                for _ in range(r.uint()):
                    seen(_any_depth(r, limit))
            elif ref == 9:  # subdocument
                r.string()
                seen(_any_depth(r, limit))
            else:
                raise UpdateError(f"unknown content type {ref}")
    return deepest
