"""Tool calls streamed in fragments (no process): what the gateway sends is what an
OpenAI-upstream worker puts back together, for any calls and any fragment size."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from igora.engines.base import Finish
from igora.engines.openai_wire import Choices as _Choices
from igora.gateway.app import Chunks, Job

names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_-]{0,20}", fullmatch=True)
arguments = st.dictionaries(
    st.text(max_size=8),
    st.one_of(st.text(max_size=40), st.integers(), st.booleans(), st.none()),
    max_size=6,
).map(lambda d: json.dumps(d, ensure_ascii=False))
calls = st.lists(
    st.builds(
        lambda i, n, a: {
            "id": f"call_{i}",
            "type": "function",
            "function": {"name": n, "arguments": a},
        },
        st.integers(0, 10**6),
        names,
        arguments,
    ),
    min_size=1,
    max_size=4,
)


def _chunks(calls: list[dict[str, Any]], index: int = 0) -> list[dict[str, Any]]:
    job = Job("chat", [], None, {}, True, False, None)
    return list(Chunks(job, "chatcmpl-x", 0, "m").tool_calls(calls, index))


@settings(max_examples=200, deadline=None)
@given(calls)
def test_streamed_tool_calls_are_put_back_together(sent: list[dict[str, Any]]) -> None:
    chunks = _chunks(sent)
    answers = _Choices()
    for chunk in chunks:
        (choice,) = chunk["choices"]
        assert choice["index"] == 0 and choice["finish_reason"] is None
        answers.add(choice)
    assert answers.finish(Finish("tool_calls")).tool_calls == sent
    # One opening delta per call (id, type, name, empty arguments), then fragments only.
    openings = [c for c in chunks if c["choices"][0]["delta"]["tool_calls"][0].get("id")]
    assert len(openings) == len(sent)
    for c in openings:
        assert c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"] == ""


@given(calls, calls)
def test_calls_of_several_choices_stay_apart(
    first: list[dict[str, Any]], second: list[dict[str, Any]]
) -> None:
    answers = _Choices()
    for chunk in _chunks(first, 0) + _chunks(second, 1):
        answers.add(chunk["choices"][0])
    finish = answers.finish(Finish("tool_calls"))
    assert finish.tool_calls == first
    assert finish.choices is not None and finish.choices[1]["toolCalls"] == second
