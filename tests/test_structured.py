"""Structured answers on grammar engines (no process): bounded schemas, the plan of a
request, and how a constrained answer is read back and checked."""

from __future__ import annotations

import json

import pytest

from igora.engines.base import EngineError, Request
from igora.engines.structured import MAX_ITEMS, MAX_STRING, bounded, check, plan, read_answer

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "age": {"type": "integer", "minimum": 0},
        "kind": {"type": "string", "enum": ["a", "b"]},
    },
    "required": ["name", "age"],
    "$defs": {"X": {"type": "string", "minLength": 500}},
}
TOOL = {
    "type": "function",
    "function": {
        "name": "f",
        "parameters": {
            "type": "object",
            "properties": {"q": {"type": "string"}},
            "required": ["q"],
        },
    },
}


def test_bounded_schema_limits_strings_arrays_and_objects_only_where_unbounded() -> None:
    b = bounded(PERSON)
    props = b["properties"]
    assert props["name"]["maxLength"] == MAX_STRING
    assert props["tags"]["maxItems"] == MAX_ITEMS and props["tags"]["items"]["maxLength"]
    assert "maxLength" not in props["kind"]  # an enum is bounded already
    assert b["additionalProperties"] is False
    assert b["$defs"]["X"]["maxLength"] == 500  # never below the schema's own minimum
    assert PERSON["properties"]["name"] == {"type": "string"}  # the original is untouched


def test_check_parses_and_validates_against_the_schema_as_given() -> None:
    assert check('{"name": "Tom", "age": 3}', PERSON) == {"name": "Tom", "age": 3}
    with pytest.raises(EngineError, match="not valid JSON"):
        check('{"name": "Tom", "age": ', PERSON)
    with pytest.raises(EngineError, match="does not validate"):
        check('{"name": "Tom", "age": -1}', PERSON)  # minimum: not in the grammar


@pytest.mark.parametrize(
    "choice,answer,content,call",
    [
        ({"type": "function", "function": {"name": "f"}}, '{"q": "x"}', "", ("f", {"q": "x"})),
        ("required", '{"name": "f", "arguments": {"q": "y"}}', "", ("f", {"q": "y"})),
        ("auto", '{"name": "f", "arguments": {"q": "z"}}', "", ("f", {"q": "z"})),
        ("auto", '{"answer": "Hello"}', "Hello", None),
    ],
)
def test_tool_answers_are_read_back_as_calls_or_text(
    choice: object, answer: str, content: str, call: tuple[str, dict] | None
) -> None:
    p = plan(Request([{"role": "user", "content": "q"}], tools=[TOOL], tool_choice=choice))  # type: ignore[arg-type]
    text, calls = read_answer(p, answer)
    assert text == content
    if call is None:
        assert calls is None
    else:
        assert calls and calls[0]["function"]["name"] == call[0]
        assert json.loads(calls[0]["function"]["arguments"]) == call[1]
        assert calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"


def test_tool_choice_none_and_plain_requests_are_not_constrained() -> None:
    assert plan(Request([], tools=[TOOL], tool_choice="none")).mode == "text"
    assert plan(Request([])).mode == "text"
    assert plan(Request([], response_format={"type": "json_object"})).json_object
