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


def update_depth(update: bytes, limit: int = MAX_DEPTH) -> int:
    """Deepest value nesting in a v1 update; raise UpdateError if malformed or > limit."""
    r = Reader(update, UpdateError)
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
                    r.chunk()  # root type name
                else:
                    r.uint(), r.uint()  # parent id
                if info & 0x20:
                    r.chunk()  # key in the parent map
            if ref == 1:  # deleted
                r.uint()
            elif ref == 2:  # JSON strings
                for _ in range(r.uint()):
                    seen(_json_depth(r.chunk()))
            elif ref in (3, 4):  # binary, string
                r.chunk()
            elif ref == 5:  # embed (JSON)
                seen(_json_depth(r.chunk()))
            elif ref == 6:  # format: key, JSON value
                r.chunk()
                seen(_json_depth(r.chunk()))
            elif ref == 7:  # nested shared type
                if r.uint() in (3, 5):  # XmlElement, XmlHook carry a name
                    r.chunk()
            elif ref == 8:  # any values
                for _ in range(r.uint()):
                    seen(_any_depth(r, limit))
            elif ref == 9:  # subdocument
                r.chunk()
                seen(_any_depth(r, limit))
            else:
                raise UpdateError(f"unknown content type {ref}")
    return deepest
