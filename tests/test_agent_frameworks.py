"""What agent frameworks ask of the OpenAI API, with the official ``openai`` SDK,
LangChain and the OpenAI Agents SDK: structured outputs (``parse`` with a Pydantic model,
``json_object``), tool calls (forced, ``auto``, streamed), ``n`` > 1, embeddings, and the
same through the Responses API (``/v1/responses``).

Each runs through a gateway, the market, the broker and a llama.cpp worker on the bundled
model (the session's ``llama_market``), and through an OpenAI-upstream worker on a second
market whose upstream is that first gateway: a real OpenAI-compatible server running
llama.cpp, so every field is forwarded twice and answered by a real model.

Validity is the bar, not the 135M model's judgement: a schema-constrained answer parses
and validates every time, a forced tool call always carries arguments that parse.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel

from igora import TaskFailed
from igora.testing import wait_until

from .conftest import ROOT, Cluster, Proc


class Person(BaseModel):
    name: str
    age: int


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather now in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["C", "F"]},
            },
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris, in Celsius?"}]
ASK_PERSON = [
    {"role": "system", "content": "Extract the person."},
    {"role": "user", "content": "Tom is a 31 year old baker from Lyon."},
]


def _gateway(c: Cluster, name: str) -> tuple[Proc, str]:
    proc, base = c.gateway("--heartbeat", "1", name=name)
    return proc, f"{base}/v1"


def _models(base_url: str, proc: Proc, timeout: float = 60) -> list[dict[str, Any]]:
    def served() -> list[dict[str, Any]] | None:
        assert proc.alive(), proc.log()
        try:
            r = httpx.get(f"{base_url}/models", timeout=2)
        except httpx.HTTPError:
            return None
        return list(r.json()["data"]) if r.status_code == 200 and r.json()["data"] else None

    return wait_until(served, timeout, f"no model on {base_url}", every=0.1)


class Target:
    """One way to the model: a gateway's base URL and the model name to ask for."""

    def __init__(self, base_url: str, model: str) -> None:
        self.base_url = base_url
        self.model = model
        self.sdk = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def direct(llama_market: Cluster) -> Target:
    proc, url = _gateway(llama_market, "gateway-llama")
    return Target(url, _models(url, proc)[0]["id"])


@pytest.fixture(scope="module")
def upstream(direct: Target, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    c = Cluster(tmp_path_factory.mktemp("upstream"))
    try:
        c.market()
        c.broker()
        c.worker(
            "--engine",
            "openai",
            "--base-url",
            direct.base_url,
            "--model",
            f"{direct.model}=smol-upstream",
            "--upstream-timeout",
            "120",
            name="upstream-worker",
            engine="openai",
        )
        proc, url = _gateway(c, "gateway-upstream")
        assert [m["id"] for m in _models(url, proc)] == ["smol-upstream"]
        yield Target(url, "smol-upstream")
    finally:
        c.stop()


@pytest.fixture(params=["llama", "upstream"])
def target(request: pytest.FixtureRequest) -> Target:
    return request.getfixturevalue("direct" if request.param == "llama" else "upstream")


# ---------------------------------------------------------------------- structured outputs
def test_parse_with_a_pydantic_model_always_validates(target: Target) -> None:
    for seed in (1, 2, 3):
        answer = target.sdk.chat.completions.parse(
            model=target.model,
            messages=ASK_PERSON,
            response_format=Person,
            temperature=0.9,
            seed=seed,
            max_tokens=200,
        )
        choice = answer.choices[0]
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Person)
        assert Person.model_validate_json(choice.message.content or "") == choice.message.parsed
    assert answer.usage is not None and answer.usage.prompt_tokens > 0
    assert answer.usage.completion_tokens > 0


def test_json_object_answers_a_json_object(target: Target) -> None:
    answer = target.sdk.chat.completions.create(
        model=target.model,
        response_format={"type": "json_object"},
        max_tokens=300,
        messages=[{"role": "user", "content": "Describe a cat as JSON."}],
        seed=4,
    )
    assert answer.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(answer.choices[0].message.content or ""), dict)


def test_json_cut_by_max_tokens_ends_with_length_as_openai_does(direct: Target) -> None:
    answer = direct.sdk.chat.completions.create(
        model=direct.model,
        response_format={"type": "json_object"},
        max_tokens=3,
        messages=[{"role": "user", "content": "Describe a cat as JSON."}],
    )
    assert answer.choices[0].finish_reason == "length"
    with pytest.raises(openai.LengthFinishReasonError):
        direct.sdk.chat.completions.parse(
            model=direct.model, messages=ASK_PERSON, response_format=Person, max_tokens=3
        )


# ---------------------------------------------------------------------- tools
def test_forced_tool_call_carries_arguments_that_parse(target: Target) -> None:
    for seed in (1, 2):
        answer = target.sdk.chat.completions.create(
            model=target.model,
            messages=ASK_WEATHER,
            tools=[WEATHER, TIME],
            seed=seed,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            temperature=0.9,
        )
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls or []
        assert call.type == "function" and call.id
        assert call.function.name == "get_weather"
        args = json.loads(call.function.arguments)
        assert isinstance(args["city"], str) and args["unit"] in ("C", "F")


def test_required_and_auto_tool_choices_answer_a_valid_call_or_text(target: Target) -> None:
    answer = target.sdk.chat.completions.create(
        model=target.model, messages=ASK_WEATHER, tools=[WEATHER, TIME], tool_choice="required"
    )
    (call,) = answer.choices[0].message.tool_calls or []
    assert call.function.name in ("get_weather", "get_time")
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    for messages in (ASK_WEATHER, [{"role": "user", "content": "Say hello to me."}]):
        answer = target.sdk.chat.completions.create(
            model=target.model, messages=messages, tools=[WEATHER, TIME], tool_choice="auto"
        )
        message = answer.choices[0].message
        if message.tool_calls:
            assert answer.choices[0].finish_reason == "tool_calls"
            assert message.tool_calls[0].function.name in ("get_weather", "get_time")
            assert isinstance(json.loads(message.tool_calls[0].function.arguments), dict)
        else:
            assert answer.choices[0].finish_reason == "stop"
            assert message.content and message.content.strip()


def test_streamed_tool_call_arrives_as_openai_streams_it(target: Target) -> None:
    stream = target.sdk.chat.completions.create(
        model=target.model,
        messages=ASK_WEATHER,
        tools=[WEATHER],
        stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        stream_options={"include_usage": True},
    )
    deltas, reasons, usage = [], [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            deltas += choice.delta.tool_calls or []
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    assert reasons == ["tool_calls"]
    assert deltas[0].index == 0 and deltas[0].id and deltas[0].function.name == "get_weather"
    assert len(deltas) >= 2  # the arguments come in fragments after the opening delta
    arguments = "".join(d.function.arguments or "" for d in deltas)
    assert isinstance(json.loads(arguments)["city"], str)
    assert usage is not None and usage.completion_tokens > 0
    # The SDK's own accumulator agrees.
    with target.sdk.chat.completions.stream(
        model=target.model,
        messages=ASK_WEATHER,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    ) as s:
        final = s.get_final_completion()
    assert json.loads(final.choices[0].message.tool_calls[0].function.arguments)  # type: ignore[index]


def test_a_tool_answer_can_be_sent_back(target: Target) -> None:
    first = target.sdk.chat.completions.create(
        model=target.model,
        messages=ASK_WEATHER,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    call = (first.choices[0].message.tool_calls or [])[0]
    answer = target.sdk.chat.completions.create(
        model=target.model,
        tools=[WEATHER],
        max_tokens=40,
        messages=[
            *ASK_WEATHER,
            first.choices[0].message.model_dump(exclude_none=True),  # type: ignore[list-item]
            {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
        ],
    )
    assert answer.choices[0].message.content or answer.choices[0].message.tool_calls


# ---------------------------------------------------------------------- n, embeddings
def test_n_two_gives_two_choices_streamed_or_not(target: Target) -> None:
    answer = target.sdk.chat.completions.create(
        model=target.model,
        messages=[{"role": "user", "content": "Name a fruit."}],
        n=2,
        max_tokens=12,
        temperature=1.0,
        seed=5,
    )
    assert [c.index for c in answer.choices] == [0, 1]
    assert all(c.message.content for c in answer.choices)
    assert answer.usage is not None and answer.usage.completion_tokens > 0
    texts: dict[int, str] = {}
    for chunk in target.sdk.chat.completions.create(
        model=target.model,
        messages=[{"role": "user", "content": "Name a fruit."}],
        n=2,
        max_tokens=12,
        temperature=1.0,
        seed=5,
        stream=True,
    ):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
    assert sorted(texts) == [0, 1] and all(texts.values())


def test_embeddings_have_a_fixed_dimension_and_are_deterministic(target: Target) -> None:
    texts = ["The cat sleeps.", "Stock markets fell today.", "The cat sleeps."]
    first = target.sdk.embeddings.create(model=target.model, input=texts)  # base64 by default
    again = target.sdk.embeddings.create(
        model=target.model, input="The cat sleeps.", encoding_format="float"
    )
    vectors = [d.embedding for d in first.data]
    assert [d.index for d in first.data] == [0, 1, 2]
    assert len({len(v) for v in vectors}) == 1 and len(vectors[0]) >= 64
    assert vectors[0] == pytest.approx(vectors[2], abs=1e-6)
    assert vectors[0] == pytest.approx(again.data[0].embedding, abs=1e-6)
    assert vectors[0] != pytest.approx(vectors[1], abs=1e-3)
    assert sum(x * x for x in vectors[1]) == pytest.approx(1.0, abs=1e-4)
    assert first.usage.prompt_tokens > 0
    short = target.sdk.embeddings.create(model=target.model, input="x", dimensions=32)
    assert len(short.data[0].embedding) == 32


# ---------------------------------------------------------------------- LangChain
def langchain(target: Target, **extra: Any) -> Any:
    """LangChain's ``ChatOpenAI`` on a gateway."""
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        base_url=target.base_url,
        api_key="none",  # type: ignore[arg-type]
        model=target.model,
        max_retries=0,
        temperature=0.5,
        **extra,
    )


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_langchain_structured_output_bound_tools_and_stream(direct: Target, api: str) -> None:
    """On either API: ``use_responses_api=True`` takes the Responses API."""
    from langchain_core.tools import tool

    llm = langchain(direct, use_responses_api=api == "responses")
    person = llm.with_structured_output(Person).invoke(ASK_PERSON[1]["content"])
    assert isinstance(person, Person)

    @tool
    def get_weather(city: str) -> str:
        """The weather now in a city."""
        return "sunny"

    message = llm.bind_tools([get_weather], tool_choice="get_weather").invoke(
        "What is the weather in Paris?"
    )
    (call,) = message.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str)
    assert not message.invalid_tool_calls
    pieces = [chunk.text for chunk in llm.stream("Say hello.")]
    assert len([p for p in pieces if p]) >= 2 and "".join(pieces).strip()


def test_logprobs_come_with_each_token(target: Target) -> None:
    answer = target.sdk.chat.completions.create(
        model=target.model,
        messages=[{"role": "user", "content": "Say hi."}],
        logprobs=True,
        top_logprobs=3,
        max_tokens=12,
        temperature=0.0,
    )
    choice = answer.choices[0]
    tokens = choice.logprobs.content if choice.logprobs else None
    assert tokens and "".join(t.token for t in tokens) == choice.message.content
    for t in tokens:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].logprob >= t.top_logprobs[-1].logprob
    # Greedy sampling picks the most likely token each time.
    assert all(t.token == t.top_logprobs[0].token for t in tokens)
    chunks = list(
        target.sdk.chat.completions.create(
            model=target.model,
            messages=[{"role": "user", "content": "Say hi."}],
            logprobs=True,
            max_tokens=12,
            temperature=0.0,
            stream=True,
        )
    )
    streamed = [
        t
        for c in chunks
        for ch in c.choices
        if ch.logprobs and ch.logprobs.content
        for t in ch.logprobs.content
    ]
    assert [t.token for t in streamed] == [t.token for t in tokens]


# ---------------------------------------------------------------------- the Responses API
WEATHER_TOOL = {"type": "function", **WEATHER["function"]}  # flat, as the Responses API has it


def test_responses_parse_with_a_pydantic_model_always_validates(target: Target) -> None:
    for _ in range(2):
        answer = target.sdk.responses.parse(
            model=target.model,
            input=ASK_PERSON,  # type: ignore[arg-type]
            text_format=Person,
            temperature=0.9,
            max_output_tokens=200,
        )
        assert answer.status == "completed"
        assert isinstance(answer.output_parsed, Person)
        assert Person.model_validate_json(answer.output_text) == answer.output_parsed
    assert answer.usage is not None and answer.usage.input_tokens > 0


def test_responses_function_call_and_its_output_sent_back(target: Target) -> None:
    first = target.sdk.responses.create(
        model=target.model,
        input=ASK_WEATHER,  # type: ignore[arg-type]
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        tool_choice={"type": "function", "name": "get_weather"},
    )
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.call_id.startswith("call_") and call.status == "completed"
    args = json.loads(call.arguments)
    assert isinstance(args["city"], str) and args["unit"] in ("C", "F")
    answer = target.sdk.responses.create(
        model=target.model,
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        max_output_tokens=40,
        input=[
            *ASK_WEATHER,
            call.model_dump(exclude_none=True),
            {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp": 21}'},
        ],  # type: ignore[list-item]
    )
    assert answer.status in ("completed", "incomplete")
    assert answer.output and answer.output[0].type in ("message", "function_call")


def test_responses_streamed_function_call_and_text(direct: Target) -> None:
    with direct.sdk.responses.stream(
        model=direct.model,
        input=ASK_WEATHER,  # type: ignore[arg-type]
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        tool_choice="required",
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert "response.function_call_arguments.delta" in kinds
    assert kinds[-1] == "response.completed"
    (call,) = final.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert isinstance(json.loads(call.arguments)["city"], str)
    events = list(
        direct.sdk.responses.create(
            model=direct.model, input="Say hi.", max_output_tokens=12, stream=True
        )
    )
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    end = events[-1]
    assert end.type in ("response.completed", "response.incomplete")
    assert deltas and deltas == end.response.output_text  # type: ignore[union-attr]


def test_responses_logprobs_come_with_each_token(direct: Target) -> None:
    answer = direct.sdk.responses.create(
        model=direct.model,
        input="Say hi.",
        max_output_tokens=12,
        temperature=0.0,
        top_logprobs=2,
        include=["message.output_text.logprobs"],
    )
    part = answer.output[0].content[0]  # type: ignore[union-attr]
    assert part.logprobs and "".join(t.token for t in part.logprobs) == part.text
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in part.logprobs)


def test_openai_agents_sdk_runs_agents_on_the_market(direct: Target) -> None:
    """The OpenAI Agents SDK in its own venv (scripts/test-tools.sh), on its default
    Responses API: a plain answer, a tool its runner calls, a structured output and a
    streamed run."""
    python = ROOT / ".venv" / "agents" / "bin" / "python"
    assert python.exists(), "no .venv/agents: run `make test` (scripts/test-tools.sh) first"
    run = subprocess.run(
        [str(python), str(ROOT / "tests" / "agents_sdk_run.py"), direct.base_url, direct.model],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert isinstance(got["plain"], str) and got["plain"].strip()
    (city,) = got["cities"]  # the runner called the tool once, with parsed arguments
    assert got["tool_output"] == f"Sunny, 21 C in {city}."
    assert Person.model_validate(got["person"])
    assert len(got["deltas"]) >= 2 and "".join(got["deltas"]) == got["streamed"]


# ---------------------------------------------------------------------- igora.Client
async def test_igora_client_asks_for_tools_json_choices_and_embeddings(
    llama_market: Cluster,
) -> None:
    from igora import Client

    async with Client(llama_market.url) as client:
        answer = await client.chat(ASK_WEATHER, tools=[WEATHER], tool_choice="required")
        (call,) = answer.tool_calls
        assert call["function"]["name"] == "get_weather" and answer.finish_reason == "tool_calls"
        assert isinstance(json.loads(call["function"]["arguments"])["city"], str)
        text = await client.chat(
            ASK_PERSON,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "person", "schema": Person.model_json_schema()},
            },
        )
        assert isinstance(Person.model_validate_json(text), Person)
        several = await client.chat("Name a fruit.", n=2, max_tokens=8)
        assert [c["index"] for c in several.choices] == [0, 1]
        vectors = await client.embed(["a cat", "a cat", "the stock market"])
        assert vectors[0] == vectors[1] != vectors[2] and len(vectors[0]) == len(vectors[2])


async def test_embedding_model_is_a_second_model_that_only_embeds(
    cluster: Cluster,
    tmp_path: Path,
) -> None:
    from igora import Client, NoWorkerError
    from igora.engines.llama import bundled_model

    embedder = tmp_path / "tiny-embedder.gguf"
    shutil.copyfile(bundled_model(), embedder)
    cluster.market()
    cluster.broker()
    cluster.worker(
        "--embedding-model", str(embedder), "--no-warmup", name="llama-embed", engine="llama"
    )
    (worker,) = cluster.wait_agents("worker", 1, timeout=120)
    caps = {m["name"]: m["capabilities"] for m in worker["models"]}
    assert caps["tiny-embedder"] == ["embed"] and "embed" not in next(
        c for name, c in caps.items() if name != "tiny-embedder"
    )
    async with Client(cluster.url) as client:
        (vector,) = await client.embed("a cat", model="tiny-embedder")
        assert len(vector) == 576
        chat_model = next(name for name in caps if name != "tiny-embedder")
        with pytest.raises(NoWorkerError) as info:
            await client.embed("a cat", model=chat_model, wait_worker=1.0)
        assert info.value.missing == ("embed",)
        with pytest.raises(TaskFailed, match="dimensions must be at most 576"):
            await client.embed("a cat", model="tiny-embedder", dimensions=1000)
