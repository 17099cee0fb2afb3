"""The official ``openai`` package (sync and async, stream and not) against ``igora up``
with the real bundled model (SmolLM2-135M-Instruct on llama.cpp).

One ``igora up`` (market, broker, llama worker, gateway) serves the whole module.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from .conftest import Proc, free_port

QUESTION = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]


class Up:
    def __init__(self, tmp: Path) -> None:
        self.market_port = free_port()
        self.gateway_port = free_port()
        self.base_url = f"http://127.0.0.1:{self.gateway_port}/v1"
        self.proc = Proc(
            [
                "up",
                "--port",
                str(self.market_port),
                "--gateway-port",
                str(self.gateway_port),
                "--data",
                str(tmp / "data"),
                "--no-check",
            ],
            tmp / "up.log",
        )

    def models(self) -> list[str]:
        try:
            r = httpx.get(f"{self.base_url}/models", timeout=2)
            return [m["id"] for m in r.json()["data"]] if r.status_code == 200 else []
        except (httpx.HTTPError, ValueError, KeyError):
            return []


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Up]:
    u = Up(tmp_path_factory.mktemp("gateway-up"))
    failed_before = request.session.testsfailed
    try:
        end = time.monotonic() + 120
        while not u.models():
            assert u.proc.alive(), f"igora up exited:\n{u.proc.log()}"
            assert time.monotonic() < end, f"no model served after 120 s:\n{u.proc.log()}"
            time.sleep(0.2)
        yield u
    finally:
        if request.session.testsfailed > failed_before:
            print(u.proc.log()[-8000:])
        u.proc.stop()  # SIGTERM: `igora up` stops its children


@pytest.fixture(scope="module")
def model(up: Up) -> str:
    return up.models()[0]


def test_models_and_model_by_id(up: Up, model: str) -> None:
    client = openai.OpenAI(base_url=up.base_url, api_key="none")
    assert [m.id for m in client.models.list()] == [model]
    assert client.models.retrieve(model).id == model


def test_sync_chat(up: Up, model: str) -> None:
    client = openai.OpenAI(base_url=up.base_url, api_key="none")
    answer = client.chat.completions.create(
        model=model,
        messages=QUESTION,  # type: ignore[arg-type]
        max_tokens=16,
        temperature=0,
        seed=1,
    )
    assert answer.id.startswith("chatcmpl-") and answer.model == model
    choice = answer.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert answer.usage is not None
    assert 1 <= answer.usage.completion_tokens <= 16
    assert answer.usage.prompt_tokens > 0
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_sync_stream_with_usage(up: Up, model: str) -> None:
    client = openai.OpenAI(base_url=up.base_url, api_key="none")
    stream = client.chat.completions.create(
        model=model,
        messages=QUESTION,  # type: ignore[arg-type]
        max_tokens=16,
        temperature=0,
        seed=1,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    reasons = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert reasons in (["stop"], ["length"])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert 1 <= chunks[-1].usage.completion_tokens <= 16


def test_temperature_zero_and_a_seed_give_the_same_answer_streamed_or_not(
    up: Up, model: str
) -> None:
    client = openai.OpenAI(base_url=up.base_url, api_key="none")
    options = dict(model=model, messages=QUESTION, max_tokens=16, temperature=0, seed=3)
    plain = client.chat.completions.create(**options)  # type: ignore[call-overload]
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(**options, stream=True)
        if c.choices
    )
    assert plain.choices[0].message.content == streamed


def test_max_tokens_cuts_with_finish_reason_length(up: Up, model: str) -> None:
    client = openai.OpenAI(base_url=up.base_url, api_key="none")
    answer = client.chat.completions.create(
        model=model,
        max_completion_tokens=3,
        temperature=0,
        messages=[{"role": "user", "content": "Write a long story about a dragon."}],
    )
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage is not None and answer.usage.completion_tokens <= 3


def test_legacy_completion(up: Up, model: str) -> None:
    client = openai.OpenAI(base_url=up.base_url, api_key="none")
    answer = client.completions.create(
        model=model, prompt="Name a colour.", max_tokens=8, temperature=0
    )
    assert answer.object == "text_completion"
    assert answer.choices[0].text.strip()
    assert answer.choices[0].finish_reason in ("stop", "length")


async def test_async_chat_stream_and_not_at_once(up: Up, model: str) -> None:
    client = openai.AsyncOpenAI(base_url=up.base_url, api_key="none")

    async def plain() -> str:
        answer = await client.chat.completions.create(
            model=model, messages=QUESTION, max_tokens=16, temperature=0
        )  # type: ignore[arg-type]
        return answer.choices[0].message.content or ""

    async def streamed() -> str:
        stream = await client.chat.completions.create(
            model="default",
            messages=QUESTION,
            max_tokens=16,
            temperature=0,  # type: ignore[arg-type]
            stream=True,
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    a, b = await asyncio.wait_for(asyncio.gather(plain(), streamed()), 120)
    assert a.strip() and b.strip()
    await client.close()


async def test_async_unknown_model_raises_not_found(up: Up) -> None:
    client = openai.AsyncOpenAI(base_url=up.base_url, api_key="none", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="no-such-model", messages=QUESTION)  # type: ignore[arg-type]
    await client.close()
