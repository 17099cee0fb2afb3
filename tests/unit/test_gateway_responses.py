"""The Responses API's request as the chat request it means (``translate.responses_job``):
no process, no market."""

from __future__ import annotations

from typing import Any

import pytest

from igora.gateway.errors import OpenAIError
from igora.gateway.openai_models import ResponsesRequest
from igora.gateway.translate import Job, responses_job

CALL = {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": '{"x": 1}'}


def job(**body: Any) -> Job:
    return responses_job(ResponsesRequest.model_validate(body))


def test_instructions_and_items_become_the_chat_messages_in_order() -> None:
    got = job(
        instructions="Be brief.",
        input=[
            {"role": "developer", "content": "Use metric units."},
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "a"},
                    {"type": "input_text", "text": "b"},
                ],
            },
            {"type": "reasoning", "summary": []},
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Let me look."}],
            },
            CALL,
            {**CALL, "call_id": "call_2"},
            {"type": "function_call_output", "call_id": "call_1", "output": "one"},
            {
                "type": "function_call_output",
                "call_id": "call_2",
                "output": [{"type": "input_text", "text": "two"}],
            },
        ],
    )
    assert got.kind == "responses" and got.prefix == "resp_"
    calls = [
        {"id": i, "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
        for i in ("call_1", "call_2")
    ]
    assert got.prompt == [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": "Use metric units."},
        {"role": "user", "content": "a\nb"},
        # A turn's text and the calls after it are one assistant message, as in chat.
        {"role": "assistant", "content": "Let me look.", "tool_calls": calls},
        {"role": "tool", "content": "one", "tool_call_id": "call_1"},
        {"role": "tool", "content": "two", "tool_call_id": "call_2"},
    ]


def test_a_call_without_text_before_it_is_an_assistant_message_of_its_own() -> None:
    got = job(input=[{"role": "user", "content": "q"}, CALL])
    assert got.prompt[-1]["role"] == "assistant"  # type: ignore[index]
    assert got.prompt[-1]["tool_calls"][0]["id"] == "call_1"  # type: ignore[index]


def test_tools_format_limits_and_logprobs_in_the_task_options() -> None:
    got = job(
        input="q",
        max_output_tokens=7,
        temperature=0.2,
        tools=[{"type": "function", "name": "f", "parameters": {"type": "object"}}],
        tool_choice={"type": "function", "name": "f"},
        text={"format": {"type": "json_schema", "name": "p", "schema": {"type": "object"}}},
        include=["message.output_text.logprobs"],
    )
    o = got.options
    assert o["max_tokens"] == 7 and o["temperature"] == 0.2
    assert o["tools"] == [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    ]
    assert o["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert o["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "p", "schema": {"type": "object"}},
    }
    assert o["logprobs"] is True
    assert got.echoed["max_output_tokens"] == 7 and got.echoed["tool_choice"]["name"] == "f"


def test_auto_or_none_without_tools_is_the_default_not_an_error() -> None:
    for choice in ("auto", "none"):
        assert "tool_choice" not in job(input="q", tool_choice=choice).options
    with pytest.raises(OpenAIError, match="tool_choice needs tools"):
        job(input="q", tool_choice="required")


@pytest.mark.parametrize(
    "body,param",
    [
        ({"input": "q", "previous_response_id": "resp_1"}, "previous_response_id"),
        (
            {"input": [{"type": "function_call_output", "output": "x"}]},
            "input[0].call_id and output",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            "input[0].content[0]",
        ),
        ({"input": "q", "tools": [{"type": "file_search"}]}, "tools[0].type"),
    ],
)
def test_what_cannot_be_served_is_a_400_naming_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(OpenAIError) as err:
        job(**body)
    assert err.value.status == 400 and err.value.param == param
