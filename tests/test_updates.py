"""The market's reader of Yjs updates (igora.updates): depth check and struct parsing."""

from __future__ import annotations

import itertools

import pytest
from pycrdt import Array, Doc, Map, Text

from igora.updates import MAX_DEPTH, UpdateError, check_update, parse


def update_of(value: object) -> bytes:
    doc = Doc()
    doc.get("todos", type=Map)["k"] = value
    return doc.get_update()


def nested(levels: int) -> object:
    value: object = "x"
    for _ in range(levels):
        value = [value]
    return value


def test_deep_values_are_refused_and_brackets_inside_strings_are_not_nesting() -> None:
    check_update(update_of(nested(MAX_DEPTH - 1)))
    with pytest.raises(UpdateError, match="deeper than"):
        check_update(update_of(nested(MAX_DEPTH + 1)))
    # Brackets inside a string are no nesting: depth 1.
    check_update(update_of({"prompt": "[{" * 500}))


def test_parse_gives_each_struct_its_clock_length_parent_and_key() -> None:
    doc = Doc()
    doc.get("streams", type=Map)["t#1"] = Text("héllo 🙂")  # 🙂 is 2 UTF-16 units
    doc.get("todos", type=Map)["t"] = {"id": "t"}
    doc.get("done", type=Map)["list"] = Array([1, 2])
    parsed = parse(doc.get_update())
    keyed = {s.key: s for s in parsed.structs if s.key is not None}
    assert keyed["t#1"].parent == "streams" and keyed["t"].parent == "todos"
    text = [s for s in parsed.structs if s.ref == 4]  # string content
    assert len(text) == 1 and text[0].length == len("héllo ") + 2
    assert text[0].parent == (keyed["t#1"].client, keyed["t#1"].clock)
    clocks = sorted((s.client, s.clock, s.length) for s in parsed.structs)
    for (c1, k1, n1), (c2, k2, _) in itertools.pairwise(clocks):
        assert c1 != c2 or k1 + n1 == k2  # one client's structs tile its clock range


def test_a_string_that_is_not_utf8_is_refused_not_crashed_on() -> None:
    doc = Doc()
    doc.get("streams", type=Map)["t#1"] = Text("é" + "[" * (MAX_DEPTH + 1))
    update = doc.get_update()
    broken = update.replace("é".encode(), b"\xc3\x28")  # same length, invalid UTF-8
    with pytest.raises(UpdateError, match="not UTF-8"):
        check_update(broken)
