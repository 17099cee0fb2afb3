"""Runs agents of the OpenAI Agents SDK against a gateway and prints what they did as one
JSON line. Run by ``.venv/agents/bin/python`` (the SDK's own venv: scripts/test-tools.sh),
not by the test suite's interpreter, and imports nothing of igora:

    python tests/agents_sdk_run.py BASE_URL MODEL

The SDK speaks the Responses API by default; each agent below is one thing agent code
asks of it: a plain answer, a function tool called with arguments the SDK parses, a
structured output (``output_type``), and a streamed run.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from agents import (  # type: ignore[import-not-found]
    Agent,
    ModelSettings,
    Runner,
    function_tool,
    set_default_openai_api,
    set_default_openai_client,
    set_tracing_disabled,
)
from openai import AsyncOpenAI
from pydantic import BaseModel


class Person(BaseModel):
    name: str
    age: int


async def main(base_url: str, model: str) -> dict[str, Any]:
    set_tracing_disabled(True)
    set_default_openai_client(AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0))
    set_default_openai_api("responses")
    cities: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather now in a city."""
        cities.append(city)
        return f"Sunny, 21 C in {city}."

    plain = Agent(name="plain", instructions="Answer in one short sentence.", model=model)
    answer = await Runner.run(plain, "What is the capital of France?")
    weather = Agent(
        name="weather",
        model=model,
        tools=[get_weather],
        model_settings=ModelSettings(tool_choice="get_weather"),
        tool_use_behavior="stop_on_first_tool",
    )
    called = await Runner.run(weather, "What is the weather in Paris?")
    extract = Agent(
        name="extract", instructions="Extract the person.", model=model, output_type=Person
    )
    person = await Runner.run(extract, "Tom is a 31 year old baker from Lyon.")
    streamed = Runner.run_streamed(plain, "Say hello.")
    deltas: list[str] = []
    async for event in streamed.stream_events():
        if event.type == "raw_response_event" and event.data.type == "response.output_text.delta":
            deltas.append(event.data.delta)
    return {
        "plain": answer.final_output,
        "cities": cities,
        "tool_output": called.final_output,
        "person": person.final_output.model_dump(),
        "deltas": deltas,
        "streamed": streamed.final_output,
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], sys.argv[2]))))
